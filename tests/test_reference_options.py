"""Encoding options: a negative image per reference replaces the "no image" tokens; the views of a
reference combined (add, average, norm average, subtract) before the image projection; tiled
encoding of non-square pictures. Each checked against the formula written here."""
import pytest
import torch
import torch.nn.functional as F

import tiny_checkpoints as tc
from multiref.kernels import checkpoints
from multiref.kernels.references import ReferenceInputError
from multiref.families import tiny_models


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("adapters"))
    return {"sd15": tiny_models.tiny_unet("sd15"), "clip_vision": tiny_models.tiny_clip_vision(),
            "base": checkpoints.load_adapter(tc.write_checkpoint(folder, "ip_adapter", "sd15")[0]),
            "plus": checkpoints.load_adapter(tc.write_checkpoint(folder, "ip_adapter_plus", "sd15")[0])}


def pictures(count, height=64, width=64, seed=0):
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


def encode(host, parts, adapter, images, negative=None, **options):
    refs = host.nodes["MultiRefReference"]().make(images, "dog", 1.0, 0.0, 1.0,
                                                  negative_image=negative)[0]
    return host.nodes["MultiRefEncodeReferences"]().encode(
        refs, parts[adapter], parts["clip_vision"], parts["sd15"], 0, **options)[0][0]


def clip(parts, images, key):
    return parts["clip_vision"].encode_image(images)[key]


@pytest.mark.parametrize("adapter,key", [("base", "image_embeds"), ("plus", "penultimate_hidden_states")])
def test_negative_image_replaces_the_uncond_tokens(host, parts, adapter, key):
    views, negatives = pictures(2, seed=1), pictures(2, seed=2)
    project = parts[adapter].project
    per_view = project({key: clip(parts, negatives, key)})
    enc = encode(host, parts, adapter, views, negatives)
    tokens = per_view.shape[1]
    assert enc.uncond_tokens.shape == enc.image_tokens.shape
    assert torch.allclose(enc.uncond_tokens[0, :tokens], per_view[0], atol=1e-6)
    assert torch.allclose(enc.uncond_tokens[0, tokens:], per_view[1], atol=1e-6)
    one = encode(host, parts, adapter, views, negatives[1:])  # one negative serves every view
    assert torch.allclose(one.uncond_tokens[0, :tokens], per_view[1], atol=1e-6)
    assert torch.allclose(one.uncond_tokens[0, tokens:], per_view[1], atol=1e-6)
    assert torch.equal(one.image_tokens, enc.image_tokens)
    plain = encode(host, parts, adapter, views)
    assert (plain.uncond_tokens - enc.uncond_tokens).abs().max() > 1e-3
    with pytest.raises(ReferenceInputError, match="negative_image: 3 images for 2 views"):
        encode(host, parts, adapter, views, pictures(3))


# IPAdapter's combine_embeds, element by element over the views' CLIP features f (V, ...).
COMBINED = {
    "add": lambda f: f.sum(0),
    "average": lambda f: f.mean(0),
    "norm average": lambda f: torch.stack([f[i] / torch.sqrt((f ** 2).sum(0)) for i in range(len(f))]).mean(0),
    "subtract": lambda f: f[0] - f[1:].mean(0),
}


@pytest.mark.parametrize("how", sorted(COMBINED))
@pytest.mark.parametrize("adapter,key", [("base", "image_embeds"), ("plus", "penultimate_hidden_states")])
def test_combined_views_follow_the_formula(host, parts, how, adapter, key):
    views = pictures(3, seed=3)
    features = clip(parts, views, key).double()
    expected = parts[adapter].project({key: COMBINED[how](features)[None].float()})[0]
    enc = encode(host, parts, adapter, views, combine_views=how)
    tokens = expected.shape[0]
    assert enc.image_tokens.shape == (1, 3 * tokens, expected.shape[-1])
    for view in range(3):  # the one combined set, for every view
        assert torch.allclose(enc.image_tokens[0, view * tokens:(view + 1) * tokens], expected,
                              atol=1e-5)
    assert enc.uncond_tokens.shape == enc.image_tokens.shape


def test_copies_of_the_combined_tokens_attend_as_one_set():
    """Why repeating the combined tokens per view is the combination: attention over V copies of
    a set of keys and values equals attention over one copy (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64) for n in (5, 4, 4))
    one = F.scaled_dot_product_attention(q, k, v)
    three = F.scaled_dot_product_attention(q, k.repeat(1, 1, 3, 1), v.repeat(1, 1, 3, 1))
    assert (one - three).abs().max() < 1e-12


@pytest.mark.parametrize("height,width,boxes", [
    (64, 160, [(0, 64, 0, 64), (0, 64, 48, 112), (0, 64, 96, 160)]),  # 3 tiles, 16 px overlap
    (200, 48, [(4, 52, 0, 48), (52, 100, 0, 48), (100, 148, 0, 48), (148, 196, 0, 48)]),  # 4 max
    (64, 72, [(0, 32, 4, 36), (0, 32, 36, 68), (32, 64, 4, 36), (32, 64, 36, 68)]),  # 2 x 2
])
def test_tiles_cover_the_picture(host, parts, height, width, boxes):
    views = pictures(2, height, width, seed=4)
    enc = encode(host, parts, "plus", views, crop="tiles")
    crops = torch.cat([views[v:v + 1, t:b, l:r] for v in range(2) for t, b, l, r in boxes])
    key = "penultimate_hidden_states"
    expected = parts["plus"].project({key: clip(parts, crops, key)})
    assert torch.allclose(enc.image_tokens[0], expected.reshape(-1, expected.shape[-1]), atol=1e-5)
    assert enc.uncond_tokens.shape == enc.image_tokens.shape
    centre = encode(host, parts, "plus", views)
    assert centre.image_tokens.shape[1] == 2 * 16
