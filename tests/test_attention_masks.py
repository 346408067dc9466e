"""Per-reference attention masks (MultiRef Reference's attention_mask, IPAdapter's attn_mask) in
every routing mode, against the formula out = T + scale * sum_i w_i M_i(x) W_i(x) O_i written
out here, on the kernel, the node's patch and the host's sampler."""
import pytest
import torch
import torch.nn.functional as F

from multiref.families import unet as unet_family
from multiref.kernels import routing
from multiref.kernels.checkpoints import cross_attention_dims
from multiref.kernels.references import EncodedReference, Reference, ReferenceInputError
from multiref.nodes.references import MultiRefReference

from test_routing_kernel import HEADS, _case, _pad, plain_ip_attention, slow_relevance
from test_routing_nodes import apply, encoded, sample, tiny_adapter
from multiref.families import tiny_models


def slow_area(mask, grid):
    """A mask (h, w) on a grid (H, W): each cell the mean of the pixels it covers (cell r spans
    rows floor(r h / H) .. ceil((r + 1) h / H)), in float64 loops."""
    h, w = mask.shape
    out = torch.zeros(grid, dtype=torch.float64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            rows = slice(r * h // grid[0], -(-(r + 1) * h // grid[0]))
            cols = slice(c * w // grid[1], -(-(c + 1) * w // grid[1]))
            out[r, c] = mask[rows, cols].double().mean()
    return out.flatten()


@pytest.mark.parametrize("mode", ["weighted", "mask", "sum"])
def test_kernel_equals_the_slow_formula_in_every_mode(mode):
    """Three references: the first with one mask per image (rows show images 1 and 0), the
    second without one, the third with one mask for all; a 3 x 4 layer grid."""
    q, text_out, ks, vs, phrase = _case(11)
    g = torch.Generator().manual_seed(12)
    grid, frames = (3, 4), (1, 0)
    per_image, for_all = torch.rand(2, 7, 10, generator=g), torch.rand(1, 5, 9, generator=g)
    regions = torch.rand(3, 6, 8, generator=g)
    weights = torch.tensor([1.0, 0.5, 0.8])
    attention = torch.stack([routing.attention_mask_weights(per_image, grid, frames),
                             torch.ones(2, 12),
                             routing.attention_mask_weights(for_all, grid, frames)], dim=-1)
    k, counts = _pad(ks)
    v, _ = _pad(vs)
    fast, _ = routing.routed_cross_attention(
        q, text_out, HEADS, k, v, weights, 0.7, mode, token_counts=counts, grid=grid,
        phrases=routing.phrase_keys(phrase) if mode == "weighted" else None,
        masks=regions if mode == "mask" else None, attention_masks=attention)
    if mode == "weighted":
        relevance = slow_relevance(q, phrase, HEADS)
        routed = relevance / relevance.sum(-1, keepdim=True)
    elif mode == "mask":
        routed = torch.stack([slow_area(m, grid) for m in regions], -1).expand(2, 12, 3)
    else:
        routed = torch.ones(2, 12, 3, dtype=torch.float64)
    slow = text_out.double().clone()
    for row, frame in enumerate(frames):
        masks = (slow_area(per_image[frame], grid), torch.ones(12, dtype=torch.float64),
                 slow_area(for_all[0], grid))
        for i in range(3):
            o = plain_ip_attention(q[row:row + 1].double(), ks[i][row:row + 1].double(),
                                   vs[i][row:row + 1].double(), HEADS)[0]
            slow[row] += 0.7 * float(weights[i]) * (masks[i] * routed[row, :, i])[:, None] * o
    torch.testing.assert_close(fast.double(), slow, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sd15():
    model = tiny_models.tiny_unet("sd15")
    clip = tiny_models.tiny_text_encoder("sd15")
    return model, clip, tiny_adapter(model)


def with_mask(ref, mask):
    return EncodedReference(**{**ref.__dict__, "attention_mask": mask})


LOCATION = ("input", 1, 0)  # the tiny SD1.5 UNet's first cross-attention: 4 heads, 32 wide


def call_patch(patched, images, seed, **options):
    """The patch at LOCATION on random q, k, v of a 3 x 4 grid: the host's batch of `images`
    images as a cond chunk and an uncond chunk."""
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][LOCATION]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2 * images, 12, 32, generator=g) for _ in range(3))
    extra = {"n_heads": 4, "original_shape": [2 * images, 4, 3, 4], "block": LOCATION[:2],
             "sigmas": torch.ones(2 * images), "cond_or_uncond": [0, 1], **options}
    return q, patch(q, k, v, extra), unet_family.host_attention_call(q, k, v, extra)


def test_node_rows_read_the_mask_of_the_image_they_show(sd15):
    """Sum mode, two references, the first with one mask per image of a 3-image batch; the call
    holds images 2 and 0 (a context window, as AnimateDiff-Evolved passes it): every row, cond
    and uncond alike, gets w_i M_i[its image](x) O_i, M resized to the 3 x 4 grid."""
    model, clip, adapter = sd15
    masks = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(3))
    refs = (with_mask(encoded(adapter, "dog", 0, weight=0.9), masks), encoded(adapter, "cat", 1))
    window = {"ad_params": {"sub_idxs": [2, 0], "full_length": 3}}
    q, out, text = call_patch(apply(model, adapter, refs, clip, "sum"), 2, seed=4, **window)
    layer = adapter.bind(cross_attention_dims(model.model.diffusion_model)).layer(LOCATION)
    split = lambda t: t.view(1, -1, 4, 8).transpose(1, 2)
    for row, image in enumerate((2, 0, 2, 0)):
        expected = text[row].double()
        for i, ref in enumerate(refs):
            tokens = ref.image_tokens if row < 2 else ref.uncond_tokens
            o = F.scaled_dot_product_attention(split(q[row:row + 1]), split(layer.to_k_ip(tokens)),
                                               split(layer.to_v_ip(tokens)))
            m = slow_area(masks[image], (3, 4)) if i == 0 else 1.0
            expected = expected + 0.8 * ref.weight * (m * o.transpose(1, 2).reshape(12, 32).double().T).T
        torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["weighted", "mask", "sum"])
def test_all_zeros_is_the_reference_off_and_all_ones_no_mask(sd15, mode):
    """Exactly, in every mode: an all-zero mask acts as weight 0 (the reference left out, as a
    node without it computes), an all-ones mask as no mask."""
    model, clip, adapter = sd15
    trio = tuple(encoded(adapter, p, i) for i, p in enumerate(("dog", "cat", "hat")))
    regions = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(5))
    kw = lambda keep: {"region_masks": regions[list(keep)]} if mode == "mask" else {}
    off = (trio[0], with_mask(trio[1], torch.zeros(2, 9, 9)), trio[2])
    _, out_off, _ = call_patch(apply(model, adapter, off, clip, mode, **kw((0, 1, 2))), 1, seed=6)
    _, out_pair, _ = call_patch(apply(model, adapter, trio[::2], clip, mode, **kw((0, 2))), 1, seed=6)
    assert torch.equal(out_off, out_pair)
    ones = (trio[0], with_mask(trio[1], torch.ones(1, 9, 9)), trio[2])
    _, out_ones, _ = call_patch(apply(model, adapter, ones, clip, mode, **kw((0, 1, 2))), 1, seed=6)
    _, out_none, text = call_patch(apply(model, adapter, trio, clip, mode, **kw((0, 1, 2))), 1, seed=6)
    assert torch.equal(out_ones, out_none)
    assert not torch.equal(out_none, out_pair) and not torch.equal(out_none, text)


def test_sampling_with_masks_through_the_host(sd15):
    """One reference: an all-zero attention mask samples exactly the unpatched model, an
    all-ones one exactly the unmasked reference; the left half masked differs from both."""
    model, clip, adapter = sd15
    ref = encoded(adapter, "dog", 0)
    run = lambda mask: sample(apply(model, adapter, (with_mask(ref, mask),), clip, "sum"), clip)
    assert torch.equal(run(torch.zeros(1, 48, 80)), sample(model, clip))
    full = sample(apply(model, adapter, (ref,), clip, "sum"), clip)
    assert torch.equal(run(torch.ones(1, 48, 80)), full)
    left = torch.zeros(1, 48, 80)
    left[..., :40] = 1
    half = run(left)
    assert (half - full).abs().max() > 1e-4 and (half - sample(model, clip)).abs().max() > 1e-4


def test_mask_input_of_the_reference_node(sd15):
    image = torch.rand(1, 32, 32, 3)
    ref, = MultiRefReference().make(image, "dog", 1.0, 0.0, 1.0,
                                    attention_mask=torch.full((20, 30), 1.5))[0]
    assert ref.attention_mask.shape == (1, 20, 30) and float(ref.attention_mask.max()) == 1.0
    assert ref.masks is None  # the foreground mask stays its own input
    with pytest.raises(ReferenceInputError, match="attention_mask: 600 of 600 values are NaN"):
        MultiRefReference().make(image, "dog", 1.0, 0.0, 1.0,
                                 attention_mask=torch.full((20, 30), float("nan")))
    with pytest.raises(ReferenceInputError, match="reference attention_mask: expected a MASK"):
        Reference(images=image, attention_mask=torch.ones(2, 2))
    model, clip, adapter = sd15
    refs = (with_mask(encoded(adapter, "dog", 0), torch.rand(2, 8, 8)),)
    with pytest.raises(ValueError, match="attention_mask of reference 1: 2 masks for a batch "
                                         "with image 3; give one mask, or one per batch image"):
        call_patch(apply(model, adapter, refs, clip, "sum"), 3, seed=7)
