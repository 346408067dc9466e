"""References: the nodes build, chain and encode them with the host's real (tiny) CLIP vision, VAE
and UNet; tokens equal an independent computation; masks land on the latent grid; bad input and
mismatched parts fail with messages naming both sides."""
import hashlib

import pytest
import torch
from safetensors.torch import save_file

import tiny_checkpoints as tc
from multiref.kernels import checkpoints
from multiref.kernels.adapter import AdapterMismatchError
from multiref.kernels.references import EncodedReference, Reference, ReferenceInputError
from multiref.families import tiny_models
from test_adapters import layer_norm, slow_resampler


@pytest.fixture(scope="module")
def parts():
    return {"sd15": tiny_models.tiny_unet("sd15"), "sdxl": tiny_models.tiny_unet("sdxl"),
            "clip_vision": tiny_models.tiny_clip_vision(), "vae": tiny_models.tiny_vae()}


def adapter_and_weights(tmp_path, layout, family):
    path, written = tc.write_checkpoint(str(tmp_path), layout, family)
    return checkpoints.load_adapter(path), written


def reference_node(host, image, mask=None, previous=None, phrase="dog", weight=0.8):
    return host.nodes["MultiRefReference"]().make(image, phrase, weight, 0.1, 0.9, mask=mask,
                                                  previous=previous)[0]


def encode_node(host, refs, adapter, parts, family, vae=True, dilation=0):
    return host.nodes["MultiRefEncodeReferences"]().encode(
        refs, adapter, parts["clip_vision"], parts[family], dilation,
        vae=parts["vae"] if vae else None)[0]


def images(views, height=64, width=64, seed=0):
    return torch.rand(views, height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_plus_reference_with_views_and_mask(host, parts, tmp_path):
    adapter, written = adapter_and_weights(tmp_path, "ip_adapter_plus", "sd15")
    views = images(2)
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1  # left half is the object
    refs = reference_node(host, views, mask)
    rng = torch.get_rng_state()
    (enc,) = encode_node(host, refs, adapter, parts, "sd15")
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream is left as it was
    # The installable host's VAE samples its posterior: the draw is seeded by the views' bytes.
    torch.manual_seed(int.from_bytes(hashlib.sha256(views.numpy().tobytes()).digest()[:8],
                                     "little") % 2 ** 63)
    assert torch.equal(enc.latents, parts["vae"].encode(views))
    assert isinstance(enc, EncodedReference)
    assert enc.image_tokens.shape == (1, 2 * 16, tc.CONTEXT["sd15"])
    assert enc.uncond_tokens.shape == enc.image_tokens.shape

    proj = {k[len("image_proj."):]: v for k, v in written.items() if k.startswith("image_proj.")}
    clip = parts["clip_vision"]
    # View 1's tokens come second; view 0 is checked through the adapter alone (cheaper).
    hidden = clip.encode_image(views[1:2])["penultimate_hidden_states"]
    # fp16 weights (as published) computed in float32 vs float64 loops: 1e-4 on O(1) outputs.
    assert (enc.image_tokens[0, 16:].double() - slow_resampler(proj, hidden)[0]).abs().max() < 1e-4
    assert torch.allclose(enc.image_tokens[0, :16], adapter.project(clip.encode_image(views[:1]))[0])
    assert torch.equal(enc.uncond_tokens[0, :16], enc.uncond_tokens[0, 16:])  # one per view

    assert enc.latents.shape == (2, 4, 8, 8)
    expected_mask = torch.zeros(2, 8, 8)
    expected_mask[:, :, :4] = 1
    assert torch.equal(enc.masks, expected_mask)
    assert (enc.phrase, enc.weight, enc.start_percent, enc.end_percent) == ("dog", 0.8, 0.1, 0.9)
    assert enc.adapter_fingerprint == adapter.fingerprint

    (dilated,) = encode_node(host, refs, adapter, parts, "sd15", dilation=1)
    expected_mask[:, :, 4] = 1
    assert torch.equal(dilated.masks, expected_mask)


def test_base_reference_without_vae(host, parts, tmp_path):
    adapter, written = adapter_and_weights(tmp_path, "ip_adapter", "sdxl")
    view = images(1, height=68, width=60, seed=1)
    refs = reference_node(host, view, mask=torch.ones(68, 60))  # a single (H, W) mask
    (enc,) = encode_node(host, refs, adapter, parts, "sdxl", vae=False)
    assert enc.latents is None
    assert enc.masks.shape == (1, 8, 7)  # image size / 8, cropped as the VAE would
    embeds = parts["clip_vision"].encode_image(view)["image_embeds"].double()
    w = {k: v.double() for k, v in written.items()}
    flat = embeds @ w["image_proj.proj.weight"].T + w["image_proj.proj.bias"]
    context = tc.CONTEXT["sdxl"]
    expected = torch.cat([layer_norm(flat[:, t * context:(t + 1) * context],
                                     w["image_proj.norm.weight"], w["image_proj.norm.bias"])
                          for t in range(4)], dim=0)
    assert enc.image_tokens.shape == (1, 4, context)
    assert (enc.image_tokens[0].double() - expected).abs().max() < 1e-4


# The "no image" input each family's own code projects for its negative branch, written from
# the repositories: base adapters project a zero image_embeds vector (h94 / MIP ip_adapter.py
# IPAdapter.get_image_embeds, SynCD sample.py); h94 / MIP Plus encode a pixel tensor that is
# zero AFTER CLIPImageProcessor's normalization (IPAdapterPlus*.get_image_embeds,
# torch.zeros_like(clip_image)); SynCD encodes zeros of its [-1, 1] images through its own
# preprocess ((x + 1) / 2, then CLIP's mean / std), in sampling and in training.
SYNCD_CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
SYNCD_CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)


def plus_pixels(layout):
    if layout == "syncd":
        images = torch.zeros(1, 3, 224, 224)  # SynCD's images are in [-1, 1]
        return ((images + 1.0) / 2.0 - SYNCD_CLIP_MEAN) / SYNCD_CLIP_STD
    return torch.zeros(1, 3, 224, 224)


def expected_uncond(layout, written, clip):
    proj = {k[len("image_proj."):]: v.double() for k, v in written.items()
            if k.startswith("image_proj.")}
    if "latents" not in proj:  # base: proj(0) is the bias, split into tokens, each normed
        context = proj["norm.weight"].shape[0]
        chunks = proj["proj.bias"].reshape(-1, context)
        return layer_norm(chunks, proj["norm.weight"], proj["norm.bias"])
    hidden = clip.model(pixel_values=plus_pixels(layout), intermediate_output=-2)[1]
    return slow_resampler(proj, hidden)[0]


@pytest.mark.parametrize("layout,family", [
    ("ip_adapter", "sd15"), ("ip_adapter_plus", "sd15"), ("ip_adapter", "sdxl"),
    ("ip_adapter_plus", "sdxl"), ("mip_adapter", "sdxl"), ("mip_adapter_plus", "sdxl"),
    ("syncd", "sdxl")])
def test_uncond_tokens_follow_each_family(host, parts, tmp_path, layout, family):
    adapter, written = adapter_and_weights(tmp_path, layout, family)
    refs = reference_node(host, images(2, seed=4))
    (enc,) = encode_node(host, refs, adapter, parts, family, vae=False)
    tokens = adapter.tokens
    expected = expected_uncond(layout, written, parts["clip_vision"])
    for view in range(2):
        got = enc.uncond_tokens[0, view * tokens:(view + 1) * tokens].double()
        # fp16 weights (as published) computed in float32 vs float64: 1e-4 on O(1) outputs.
        assert (got - expected).abs().max() < 1e-4
    # The old input (a black image through the host's encode_image) gives other tokens.
    black = adapter.project(parts["clip_vision"].encode_image(torch.zeros(1, 64, 64, 3)))[0]
    assert (enc.uncond_tokens[0, :tokens] - black).abs().max() > 1e-2


def test_trained_adapter_keeps_its_base_uncond_convention(tmp_path):
    """A file the trainer writes from SynCD's checkpoint keeps SynCD's gray "no image"."""
    from multiref.training import checkpoint as train_checkpoint
    base, _ = adapter_and_weights(tmp_path, "syncd", "sdxl")
    locations = [loc for _, loc, _ in tc.TINY_BLOCKS]
    bound = base.bind(locations)
    by_location = {loc: bound.layer(loc) for loc in locations}
    path = train_checkpoint.write_adapter(
        str(tmp_path / "trained.safetensors"), base,
        {loc: layer.self_attn_lora for loc, layer in by_location.items()}, by_location)
    loaded = checkpoints.load_adapter(path)
    assert loaded.kind == "multiref" and base.uncond_convention == "gray-pixels"
    assert loaded.uncond_convention == "gray-pixels"


def test_chaining_keeps_order(host):
    first = reference_node(host, images(1), phrase="dog")
    both = reference_node(host, images(3, seed=2), previous=first, phrase="cat")
    assert [r.phrase for r in both] == ["dog", "cat"]
    assert both[0] is first[0] and both[1].images.shape[0] == 3


# ---------------------------------------------------------------------------------------------
# Errors

def test_sdxl_adapter_on_sd15_model(host, parts, tmp_path):
    adapter, _ = adapter_and_weights(tmp_path, "mip_adapter_plus", "sdxl")
    with pytest.raises(AdapterMismatchError) as err:
        encode_node(host, reference_node(host, images(1)), adapter, parts, "sd15")
    message = str(err.value)
    assert "made for SDXL" in message and "the model is SD15" in message
    assert "model_sdxl_plus.bin (" in message  # the file itself
    assert "such as ip-adapter-plus_sd15.bin" in message  # what to download instead


def test_clip_vision_width_mismatch(host, parts, tmp_path):
    _, tensors = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15")
    tensors["image_proj.proj_in.weight"] = torch.randn(tc.RESAMPLER_DIM, 40).half()
    path = str(tmp_path / "vit-other.safetensors")
    save_file(tensors, path)
    adapter = checkpoints.load_adapter(path)
    with pytest.raises(AdapterMismatchError) as err:
        encode_node(host, reference_node(host, images(1)), adapter, parts, "sd15")
    message = str(err.value)
    assert "width 32" in message and "expects width 40" in message and "vit-other" in message


def test_mask_of_another_size(host):
    with pytest.raises(ReferenceInputError) as err:
        reference_node(host, images(2), mask=torch.ones(2, 32, 64))
    assert "(2, 32, 64)" in str(err.value) and "(2, 64, 64)" in str(err.value)
    assert str(err.value).startswith("reference mask")


def test_empty_image_batch(host):
    with pytest.raises(ReferenceInputError, match="image batch is empty"):
        reference_node(host, torch.zeros(0, 64, 64, 3))


def test_nan_image():
    bad = images(1)
    bad[0, 3, 3, 0] = float("nan")
    with pytest.raises(ReferenceInputError, match="NaN"):
        Reference(images=bad)


def test_mask_without_foreground_on_latent_grid(host, parts, tmp_path):
    adapter, _ = adapter_and_weights(tmp_path, "ip_adapter", "sd15")
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:12, 10:12] = 1  # 2x2 pixels: less than half of any 8x8 latent cell
    refs = reference_node(host, images(1), mask)
    with pytest.raises(ReferenceInputError, match="no foreground"):
        encode_node(host, refs, adapter, parts, "sd15")


def test_soft_mask_values_are_cell_averages(host, parts, tmp_path):
    """mask_values soft: each latent cell holds the mean of its pixels' mask values (grey kept,
    0 stays out), dilation takes the largest value nearby; binary stays {0, 1}."""
    adapter, _ = adapter_and_weights(tmp_path, "ip_adapter", "sd15")
    mask = torch.zeros(64, 64)
    mask[:, :20] = 1.0   # cells 0-1 whole, cell 2 half (pixels 16-19 of 16-23)
    mask[:, 20:24] = 0.0
    mask[:, 24:32] = 0.3  # cell 3 grey
    refs = reference_node(host, images(1), mask)
    node = host.nodes["MultiRefEncodeReferences"]()
    args = (refs, adapter, parts["clip_vision"], parts["sd15"])
    (soft,) = node.encode(*args, 0, mask_values="soft")[0]
    cells = torch.tensor([1.0, 1.0, 0.5, 0.3, 0, 0, 0, 0])
    torch.testing.assert_close(soft.masks[0], cells.expand(8, 8), rtol=0, atol=1e-6)
    (grown,) = node.encode(*args, 1, mask_values="soft")[0]
    torch.testing.assert_close(grown.masks[0, 0], torch.tensor([1.0, 1, 1, 0.5, 0.3, 0, 0, 0]),
                               rtol=0, atol=1e-6)
    (binary,) = node.encode(*args, 0)[0]
    assert torch.equal(binary.masks[0, 0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0]))
    with pytest.raises(ReferenceInputError, match="mask_values"):
        node.encode(*args, 0, mask_values="grey")
