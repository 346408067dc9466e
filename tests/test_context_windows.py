"""Context windows (AnimateDiff-style): a node that calls the model on windows of the batch's
images. Routing and Masked Shared Attention see a sub-batch in every UNet call; the rows' roles
come from that call, and what belongs to each image of the whole batch (attention masks, batch
masks) is picked by the window's indices. Where every image's result depends on that image
alone (routing, MSA reading references), windowed sampling equals the whole batch's."""
import pytest
import torch

import comfy.sample
from multiref.families import tiny_models
from multiref.families import unet as unet_family
from multiref.kernels.references import EncodedReference
from multiref.nodes.routing import MultiRefRoutingMaps

from test_msa_node import LATENT, _encoded, _msa
from test_routing_nodes import TOKENS, apply, encoded, tiny_adapter

IMAGES = 3
WINDOWS = ([2], [0, 1])  # unequal, out of order: rows must follow the indices, not positions
# Float32 rounding of a batch of another size (other matmul blocking), relative to the
# samples' scale (~100 for the random tiny UNet).
TOLERANCE = 1e-5


class WindowedCalls:
    """A model function wrapper doing what a context window node does: for each window of image
    indices, the rows of those images in every cond chunk go through the model on their own,
    with the window's indices where AnimateDiff-Evolved puts them (transformer_options
    'ad_params': sub_idxs, full_length) or as current ComfyUI's context window does (an object
    with index_list and dim under 'context_window'). `previous`: a wrapper it calls per
    window (a node placed after the pack's keeps it)."""

    def __init__(self, windows, previous=None, core=False):
        self.windows, self.previous, self.core = windows, previous, core
        self.sizes = []  # rows of every call it made

    def __deepcopy__(self, memo):  # later clones keep this one (and its sizes)
        return self

    def __call__(self, apply_model, args):
        x, timestep, c = args["input"], args["timestep"], args["c"]
        chunks = len(args["cond_or_uncond"])
        images = x.shape[0] // chunks
        out = None
        for window in self.windows:
            rows = [chunk * images + i for chunk in range(chunks) for i in window]
            sub = {key: value[rows] if torch.is_tensor(value) and value.ndim and
                   value.shape[0] == x.shape[0] else value for key, value in c.items()}
            options = dict(c["transformer_options"])
            if self.core:
                options["context_window"] = type("Window", (), {"index_list": list(window), "dim": 0})()
            else:
                options["ad_params"] = {"sub_idxs": list(window), "full_length": images}
            sub["transformer_options"] = options
            self.sizes.append(len(rows))
            if self.previous is None:
                result = apply_model(x[rows], timestep[rows], **sub)
            else:
                result = self.previous(apply_model, {"input": x[rows], "timestep": timestep[rows],
                                                     "c": sub, "cond_or_uncond": args["cond_or_uncond"]})
            out = result.new_zeros((x.shape[0],) + result.shape[1:]) if out is None else out
            out[rows] = result
        return out


def windowed(model, wrapper):
    model = model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    return model


def after(model, windows, core=False):
    """The windows node placed after the pack's nodes: it keeps their wrapper inside."""
    wrapper = WindowedCalls(windows, model.model_options.get("model_function_wrapper"), core)
    return windowed(model, wrapper), wrapper


def run(model, clip, noise, prompt="a dog and a cat"):
    cond, _ = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", [[cond, {}]],
                               [[torch.zeros_like(cond), {}]], torch.zeros_like(noise), seed=0,
                               disable_pbar=True)


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sd15():
    model = tiny_models.tiny_unet("sd15")
    clip = tiny_models.tiny_text_encoder("sd15")
    noise = torch.randn(IMAGES, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    return model, clip, noise


def test_window_indices_as_the_hosts_pass_them():
    options = {"cond_or_uncond": [0, 1], "ad_params": {"sub_idxs": [4, 2], "full_length": 6}}
    assert unet_family.row_items(options, 4) == (4, 2, 4, 2)
    assert unet_family.row_items({"cond_or_uncond": [0, 1]}, 4) == (0, 1, 0, 1)
    # A stale window of another length is not this call's.
    assert unet_family.row_items(dict(options, cond_or_uncond=[0]), 4) == (0, 1, 2, 3)
    with_refs = {"cond_or_uncond": [1], unet_family.ROLES_KEY: ("uncond", "uncond", "ref"),
                 "ad_params": {"sub_idxs": [5, 0]}}
    assert unet_family.row_items(with_refs, 3) == (5, 0, None)


@pytest.mark.parametrize("mode", ["weighted", "sum"])
def test_routing_with_per_image_attention_masks_in_windows(sd15, mode):
    """Two references, the first acting on a different region of each image: windowed
    sampling equals the whole batch's within TOLERANCE, and the windows did cut the batch."""
    model, clip, noise = sd15
    adapter = tiny_adapter(model)
    masks = torch.rand(IMAGES, 24, 32, generator=torch.Generator().manual_seed(2))
    first = encoded(adapter, "dog", 0)
    refs = (EncodedReference(**{**first.__dict__, "attention_mask": masks}),
            encoded(adapter, "cat", 1))
    routed = apply(model, adapter, refs, clip, mode)
    whole = run(routed, clip, noise)
    shown = lambda m, latent: MultiRefRoutingMaps().show(m, {"samples": latent}, 1, "all")[0]
    for core in (False, True):
        wrapper = WindowedCalls(WINDOWS, core=core)
        patched = apply(windowed(model, wrapper), adapter, refs, clip, mode)
        out = run(patched, clip, noise)
        assert sorted(set(wrapper.sizes)) == [2, 4]
        assert relative(out, whole) < TOLERANCE, core
        # The Routing Maps node shows every image's own maps, whatever window it was in.
        torch.testing.assert_close(shown(patched, out), shown(routed, whole), atol=1e-5, rtol=0)
    # Each image does read its own mask: the same masks in another order change the result.
    swapped = (EncodedReference(**{**refs[0].__dict__, "attention_mask": masks[[1, 2, 0]]}), refs[1])
    assert relative(run(apply(model, adapter, swapped, clip, mode), clip, noise), whole) > 1e-4


@pytest.mark.parametrize("scaling", ["V only", "K+mean(V) w/ C penalty"])
def test_one_view_per_batch_image(sd15, scaling):
    """A reference of three views given one per batch image, with a second reference for all:
    batch image k samples what it samples alone with a reference of view k only, within
    TOLERANCE, with the whole batch in one call and in windows (the values' mean of embeds
    scaling is each view's own)."""
    model, clip, noise = sd15
    apply_ = lambda m, refs: apply(m, adapter, refs, clip, "weighted", embeds_scaling=scaling)
    adapter = tiny_adapter(model)
    views = encoded(adapter, "dog", 0, views=IMAGES)
    ref = EncodedReference(**{**views.__dict__, "tokens_per_view": TOKENS})
    other = encoded(adapter, "cat", 1)
    whole = run(apply_(model, (ref, other)), clip, noise)
    span = lambda k: slice(k * TOKENS, (k + 1) * TOKENS)
    for k in range(IMAGES):
        view = EncodedReference(**{**views.__dict__, "image_tokens": views.image_tokens[:, span(k)],
                                   "uncond_tokens": views.uncond_tokens[:, span(k)]})
        alone = run(apply_(model, (view, other)), clip, noise[k:k + 1])
        assert relative(whole[k:k + 1], alone) < TOLERANCE, k
    out = run(apply_(windowed(model, WindowedCalls(WINDOWS)), (ref, other)), clip, noise)
    assert relative(out, whole) < TOLERANCE
    every = run(apply_(model, (views, other)), clip, noise)
    assert relative(every, whole) > 1e-4  # reading every view is another thing
    short = EncodedReference(**{**encoded(adapter, "dog", 0, views=2).__dict__,
                                "tokens_per_view": TOKENS})
    with pytest.raises(ValueError, match="reference 1 has 2 views, one per batch image, for a "
                                         "batch with image 3"):
        run(apply_(model, (short, other)), clip, noise)


def test_msa_reading_references_in_windows(sd15):
    """Every window's images read the same re-noised reference rows: windowed equals the whole
    batch within TOLERANCE, with the windows node placed before the MSA node or after it."""
    model, clip, noise = sd15
    refs = _encoded(tiny_models.tiny_vae(), 2)
    whole = run(_msa(model, refs), clip, noise)
    assert relative(whole, run(model, clip, noise)) > 1e-3  # MSA acts
    before = WindowedCalls(WINDOWS)
    out = run(_msa(windowed(model, before), refs), clip, noise)
    assert relative(out, whole) < TOLERANCE
    patched, wrapper = after(_msa(model, refs), WINDOWS)
    assert relative(run(patched, clip, noise), whole) < TOLERANCE
    # Reference rows (3 views) rode along with every window's rows.
    assert sorted(set(before.sizes)) == sorted(set(wrapper.sizes)) == [2, 4]


def test_msa_batch_masks_follow_the_window(sd15):
    """Batch mode shares inside a window (the math of context windows): windows {0, 1} and {2}
    of three images with one mask each equal two runs, on images 0-1 with masks 0-1 and on
    image 2 with mask 2."""
    model, clip, noise = sd15
    masks = (torch.rand(IMAGES, *LATENT, generator=torch.Generator().manual_seed(3)) < 0.6).float()
    patched, _ = after(_msa(model, None, mode="batch", batch_masks=masks), ([0, 1], [2]))
    out = run(patched, clip, noise)
    pair = run(_msa(model, None, mode="batch", batch_masks=masks[:2]), clip, noise[:2])
    single = run(_msa(model, None, mode="batch", batch_masks=masks[2:]), clip, noise[2:])
    assert relative(out, torch.cat([pair, single])) < TOLERANCE
    assert relative(pair, run(_msa(model, None, mode="batch", batch_masks=masks[1:]), clip,
                              noise[:2])) > 1e-4  # the masks matter
    too_few, _ = after(_msa(model, None, mode="batch", batch_masks=masks[:2]), ([0, 1], [2]))
    with pytest.raises(ValueError, match="batch_masks: 2 masks for a batch with image 3"):
        run(too_few, clip, noise)


def test_the_hosts_own_context_windows_node(sd15):
    """Current ComfyUI's Context Windows (Manual) node, batched windows of 2 images with flat
    fusing (no overlap: each image from one window): routing with per-image attention masks and
    MSA reading references sample what the whole batch samples, within TOLERANCE."""
    nodes = pytest.importorskip("comfy_extras.nodes_context_windows",
                                reason="the installable host has no context windows")
    model, clip, noise = sd15

    def with_windows(m):
        return nodes.ContextWindowsManualNode.execute(m, 2, 0, "batched", 1, False, "flat", 0)[0]

    adapter = tiny_adapter(model)
    masks = torch.rand(IMAGES, 24, 32, generator=torch.Generator().manual_seed(4))
    first = encoded(adapter, "dog", 0)
    refs = (EncodedReference(**{**first.__dict__, "attention_mask": masks}),
            encoded(adapter, "cat", 1))
    routed = apply(model, adapter, refs, clip, "weighted")
    whole = run(routed, clip, noise)
    sizes = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]))
    try:
        assert relative(run(with_windows(routed), clip, noise), whole) < TOLERANCE
        assert relative(run(apply(with_windows(model), adapter, refs, clip, "weighted"), clip,
                            noise), whole) < TOLERANCE
        assert max(sizes) < 2 * IMAGES  # the host did call the model on windows
        refs = _encoded(tiny_models.tiny_vae(), 2)
        msa_whole = run(_msa(model, refs), clip, noise)
        assert relative(run(with_windows(_msa(model, refs)), clip, noise), msa_whole) < TOLERANCE
    finally:
        handle.remove()
