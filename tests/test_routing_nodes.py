"""MultiRefApplyAdapter / MultiRefRoutingMaps on the tiny real UNet through the host's sampler."""

import pytest
import torch
import torch.nn.functional as F

import comfy.sample
import comfy.sd
from multiref.kernels.adapter import build_adapter
from multiref.kernels.adapter import published_order
from multiref.kernels.checkpoints import cross_attention_dims
from multiref.kernels.references import EncodedReference
from multiref.families import tiny_models
from multiref.families import unet as unet_family
from multiref.nodes.routing import (RECORDER_KEY, MultiRefApplyAdapter, MultiRefRoutingMaps,
                                    RoutingRecorder)

TOKENS = 4


def tiny_adapter(model, seed=0, text_to_weight=False):
    """Random weights with the published key layout, sized for the tiny UNet's cross-attentions."""
    g = torch.Generator().manual_seed(seed)
    dims = cross_attention_dims(model.model.diffusion_model)
    context = next(iter(dims.values()))[0]
    tensors = {"image_proj.proj.weight": torch.randn(TOKENS * context, 24, generator=g) * 0.2,
               "image_proj.proj.bias": torch.zeros(TOKENS * context),
               "image_proj.norm.weight": torch.ones(context),
               "image_proj.norm.bias": torch.zeros(context)}
    for i, location in enumerate(published_order(dims)):
        ctx, inner = dims[location]
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(inner, ctx, generator=g) / ctx ** 0.5
        if text_to_weight:
            tensors[f"ip_adapter.{2 * i + 1}.text_to_weight.weight"] = torch.randn(1, inner, generator=g)
    kind = "mip_adapter" if text_to_weight else "ip_adapter"
    family = "sdxl" if context == tiny_models.SDXL_CONTEXT else "sd15"
    return build_adapter(kind, family, tensors, source="tiny")


def encoded(adapter, phrase, seed, views=1, weight=1.0, start=0.0, end=1.0):
    g = torch.Generator().manual_seed(100 + seed)
    shape = (1, views * TOKENS, adapter.context_dim)
    return EncodedReference(image_tokens=torch.randn(shape, generator=g),
                            uncond_tokens=torch.randn(shape, generator=g) * 0.1, latents=None,
                            masks=None, phrase=phrase, weight=weight, start_percent=start,
                            end_percent=end, adapter_fingerprint=adapter.fingerprint)


def sample(model, clip, family="sd15", height=6, width=10, steps=2, batch=1):
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a dog and a cat"), return_pooled=True)
    extra = ({"pooled_output": pooled, "width": width * 8, "height": height * 8}
             if family == "sdxl" else {})
    noise = torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", [[cond, extra]],
                               [[torch.zeros_like(cond), dict(extra)]],
                               torch.zeros(batch, 4, height, width), seed=0, disable_pbar=True)


def plain_ip_adapter(model, adapter, references, scale):
    """Plain IP-Adapter, written independently: at each cross-attention, text attention plus
    scale * SDPA over each reference's projected tokens (image tokens on prompt rows, uncond tokens
    on negative rows), every reference added."""
    patched = model.clone()
    adapter = adapter.bind(cross_attention_dims(model.model.diffusion_model))

    def make(location, inner):
        layer = adapter.layer(location)

        def attention(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            heads = extra_options["n_heads"]
            roles = unet_family.row_roles(extra_options, q.shape[0])
            for ref in references:
                for row, role in enumerate(roles):
                    tokens = ref.image_tokens if role == "full" else ref.uncond_tokens
                    ik = layer.to_k_ip(tokens.to(q)).view(1, -1, heads, q.shape[-1] // heads)
                    iv = layer.to_v_ip(tokens.to(q)).view(1, -1, heads, q.shape[-1] // heads)
                    qr = q[row:row + 1].view(1, -1, heads, q.shape[-1] // heads)
                    o = F.scaled_dot_product_attention(qr.transpose(1, 2), ik.transpose(1, 2),
                                                       iv.transpose(1, 2))
                    out[row] = out[row] + scale * ref.weight * o.transpose(1, 2).reshape(q.shape[1:])
            return out
        return attention

    unet_family.set_attention_patch(patched, "attn2", make)
    return patched


def apply(model, adapter, refs, clip, mode="weighted", scale=0.8, **kw):
    return MultiRefApplyAdapter().apply(model, adapter, refs, clip, mode, scale, 0.0, 1.0, **kw)[0]


@pytest.fixture(scope="module")
def sd15():
    model = tiny_models.tiny_unet("sd15")
    clip = tiny_models.tiny_text_encoder("sd15")
    adapter = tiny_adapter(model)
    three = tuple(encoded(adapter, p, i, views=1 + i % 2, weight=w)
                  for i, (p, w) in enumerate([("dog", 1.0), ("cat", 0.5), ("hat", 0.8)]))
    # Samples several tests compare with (each sample costs seconds on a shared CPU).
    shared = {"unpatched": sample(model, clip),
              "sum": sample(apply(model, adapter, three, clip, "sum"), clip)}
    return model, clip, adapter, three, shared


def test_one_reference_weighted_and_sum_equal_plain_ip_adapter(sd15):
    model, clip, adapter, three, shared = sd15
    one = (encoded(adapter, "dog", 0),)
    routed = sample(apply(model, adapter, one, clip, "weighted"), clip)
    plain = sample(plain_ip_adapter(model, adapter, one, 0.8), clip)
    assert (routed - shared["unpatched"]).abs().max() > 1e-3  # the adapter does act
    torch.testing.assert_close(routed, plain, atol=1e-4, rtol=1e-4)
    plain = sample(plain_ip_adapter(model, adapter, three, 0.8), clip)
    torch.testing.assert_close(shared["sum"], plain, atol=1e-4, rtol=1e-4)


def test_mask_mode_zero_is_no_adapter_one_is_full_strength(sd15):
    model, clip, adapter, three, shared = sd15
    off = sample(apply(model, adapter, three, clip, "mask", region_masks=torch.zeros(3, 48, 80)), clip)
    assert torch.equal(off, shared["unpatched"])
    full = sample(apply(model, adapter, three, clip, "mask", region_masks=torch.ones(3, 48, 80)), clip)
    assert torch.equal(full, shared["sum"])


def test_recorder_counts_schedule_steps_for_two_evaluation_samplers():
    """dpm_2 evaluates at sigma_k and at a midpoint, heun at sigma_k and sigma_k+1: with the
    schedule each evaluation lands in its step; without it each lower sigma is a step."""
    schedule = torch.tensor([10.0, 5.0, 2.0, 0.0])
    maps = torch.ones(1, 4, 2)
    for evaluations, steps in (([10, 7, 5, 3.2, 2], [0, 0, 1, 1, 2]),  # dpm_2
                               ([10, 5, 5, 2, 2], [0, 1, 1, 2, 2])):  # heun
        with_schedule, without = RoutingRecorder(), RoutingRecorder()
        for sigma in evaluations:
            with_schedule.record(float(sigma), "input", (2, 2), maps, schedule)
            without.record(float(sigma), "input", (2, 2), maps)
        assert with_schedule.steps == 3
        assert without.steps == len(set(evaluations))
        assert sorted(k[0] for k in with_schedule.sums) == sorted(set(steps))
        assert [with_schedule.sums[(k, "input", (2, 2))][1] for k in range(3)] == \
            [steps.count(k) for k in range(3)]
        # A higher sigma starts a new run.
        with_schedule.record(10.0, "input", (2, 2), maps, schedule)
        assert with_schedule.steps == 1


def test_maps_of_a_two_evaluation_sampler_through_the_host(sd15):
    """A real dpm_2 run: the maps count the schedule's steps where the host passes its schedule
    to the model (current ComfyUI), each distinct sigma where it does not (the installable one)."""
    model, clip, adapter, _, _ = sd15
    refs = tuple(encoded(adapter, p, i) for i, p in enumerate(["dog", "cat"]))
    patched = apply(model, adapter, refs, clip, "weighted")
    passed, sigmas = [], set()

    def wrapper(apply_model, args):
        passed.append("sample_sigmas" in args["c"].get("transformer_options", {}))
        sigmas.add(float(args["timestep"][0]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    watched = patched.clone()
    watched.set_model_unet_function_wrapper(wrapper)
    cond, _ = clip.encode_from_tokens(clip.tokenize("a dog and a cat"), return_pooled=True)
    noise = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(watched, noise, 3, 5.0, "dpm_2", "normal", [[cond, {}]],
                        [[torch.zeros_like(cond), {}]], torch.zeros(1, 4, 6, 10), seed=0,
                        disable_pbar=True)
    recorder = patched.model_options["transformer_options"][RECORDER_KEY]
    assert len(sigmas) == 5  # three steps, two of them with a midpoint evaluation
    assert recorder.steps == (3 if all(passed) else 5)


def test_three_references_sample_non_square_with_maps(sd15, host):
    model, clip, adapter, _, _ = sd15
    refs = tuple(encoded(adapter, p, i, views=1 + i % 2, start=0.0 if i < 2 else 0.5)
                 for i, p in enumerate(["dog", "cat", "red hat"]))
    patched = apply(model, adapter, refs, clip, "weighted")
    out = sample(patched, clip, height=6, width=10, steps=3, batch=2)
    assert out.shape == (2, 4, 6, 10) and torch.isfinite(out).all()
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    recorder = patched.model_options["transformer_options"][RECORDER_KEY]
    assert recorder.steps == 3
    images, = MultiRefRoutingMaps().show(patched, {"samples": out}, 1, "all")
    assert images.shape == (2, 48, 80, 3)
    # weighted maps sum to one over the references: each pixel is a convex mix of the colours
    maps = recorder.maps(1, unet_family.BLOCK_GROUPS["all"], (48, 80))
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 48, 80), atol=1e-4, rtol=0)
    assert set(unet_family.BLOCK_GROUPS) == {"all", "down", "up", "middle"}
    down, = MultiRefRoutingMaps().show(patched, {"samples": out}, 99, "down")
    assert down.shape == images.shape and not torch.equal(down, images)
    assert {"MultiRefApplyAdapter", "MultiRefRoutingMaps"} <= set(host.nodes)


def test_sdxl_weighted_with_learned_gate_samples():
    model = tiny_models.tiny_unet("sdxl")
    clip = tiny_models.tiny_text_encoder("sdxl")
    adapter = tiny_adapter(model, seed=3, text_to_weight=True)
    refs = tuple(encoded(adapter, p, i) for i, p in enumerate(["dog", "cat", "hat"]))
    out = sample(apply(model, adapter, refs, clip, "weighted"), clip, "sdxl", height=8, width=6)
    assert out.shape == (1, 4, 8, 6) and torch.isfinite(out).all()
    assert (out - sample(model, clip, "sdxl", height=8, width=6)).abs().max() > 1e-3


HEADS, WIDTH = 4, 32  # the tiny SD1.5 UNet's first cross-attention: 4 heads, 32 wide


def call_layer_patch(patched, roles, seed):
    """Call the patched model's input-1 cross-attention patch on random q, k, v (12 positions of
    a 4 x 3 grid), one row per role; returns q, k, v, its output and plain text attention."""
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(len(roles), 12, WIDTH, generator=g) for _ in range(3))
    options = {"n_heads": HEADS, "original_shape": [len(roles), 4, 3, 4], "block": ("input", 1),
               "sigmas": torch.ones(len(roles)), unet_family.ROLES_KEY: roles}
    return q, k, v, patch(q, k, v, options), unet_family.host_attention_call(q, k, v, options)


def test_patch_rows_by_role_and_composition(sd15):
    """full/image rows read image tokens, uncond rows uncond tokens, ref rows nothing; an attn2
    replace put before keeps running underneath."""
    model, clip, adapter, _, _ = sd15
    seen = []

    def earlier(q, k, v, extra_options):
        seen.append(extra_options["block"])
        return unet_family.host_attention_call(q, k, v, extra_options)

    base = model.clone()
    base.set_model_attn2_replace(earlier, "input", 1, 0)
    refs = (encoded(adapter, "dog", 0),)
    roles = ("full", "image", "uncond", "ref")
    q, k, v, out, text = call_layer_patch(apply(base, adapter, refs, clip, "sum"), roles, seed=1)
    heads, width = HEADS, WIDTH
    assert seen == [("input", 1)]
    bound = adapter.bind(cross_attention_dims(model.model.diffusion_model)).layer(("input", 1, 0))
    for row, tokens in ((0, refs[0].image_tokens), (1, refs[0].image_tokens), (2, refs[0].uncond_tokens)):
        ik, iv = bound.to_k_ip(tokens), bound.to_v_ip(tokens)
        split = lambda t: t.view(1, -1, heads, width // heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q[row:row + 1]), split(ik), split(iv))
        torch.testing.assert_close(out[row], text[row] + 0.8 * o.transpose(1, 2).reshape(12, width),
                                   atol=1e-4, rtol=1e-4)
    assert torch.equal(out[3], text[3])


def test_uncond_rows_are_routed_by_the_empty_prompt(sd15):
    """As MIP-Adapter: image-conditioned rows are routed by the phrases, uncond rows by the
    empty prompt's tokens at the phrases' positions (with the uncond image tokens)."""
    from multiref.kernels import routing as routing_kernel
    from multiref.families.text import empty_phrase_embeddings, phrase_embeddings
    model, clip, adapter, _, _ = sd15
    refs = (encoded(adapter, "dog", 0), encoded(adapter, "red hat", 1))
    q, k, v, out, text = call_layer_patch(apply(model, adapter, refs, clip, "weighted"),
                                          ("full", "uncond"), seed=2)
    heads = HEADS
    unet = model.model.diffusion_model
    layer = adapter.bind(cross_attention_dims(unet)).layer(("input", 1, 0))
    to_k = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    named = [phrase_embeddings(clip, r.phrase, "test") for r in refs]
    assert [e.shape[0] for e in named] == [1, 2]
    for row, embeddings, tokens in ((0, named, "image_tokens"),
                                    (1, empty_phrase_embeddings(clip, [1, 2]), "uncond_tokens")):
        ip = torch.stack([getattr(r, tokens)[0] for r in refs])[None]
        expected, _ = routing_kernel.routed_cross_attention(
            q[row:row + 1], text[row:row + 1], heads, layer.to_k_ip(ip), layer.to_v_ip(ip),
            torch.ones(2), 0.8, "weighted",
            phrases=routing_kernel.phrase_keys([to_k(e) for e in embeddings]))
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=1e-5)


def test_composes_with_a_core_lora_on_to_k(sd15):
    """A LoRA on every cross-attention to_k (what the phrase keys are projected with) loaded
    after the routing acts exactly as one loaded before it, and differs from no LoRA: the
    cached phrase keys follow the patched weights."""
    model, clip, adapter, three, _ = sd15
    g = torch.Generator().manual_seed(4)
    lora = {}
    for name, param in model.model.diffusion_model.named_parameters():
        if name.endswith("attn2.to_k.weight"):
            key = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(2, param.shape[1], generator=g)
            lora[f"{key}.lora_up.weight"] = torch.randn(param.shape[0], 2, generator=g) * 0.5
    with_lora = lambda m: comfy.sd.load_lora_for_models(m, None, lora, 1.0, 0.0)[0]
    routed = apply(model, adapter, three, clip, "weighted")
    plain_first = sample(routed, clip)
    lora_after = sample(with_lora(routed), clip)
    lora_before = sample(apply(with_lora(model), adapter, three, clip, "weighted"), clip)
    torch.testing.assert_close(lora_after, lora_before, atol=1e-5, rtol=1e-5)
    assert (lora_after - plain_first).abs().max() > 1e-3
    torch.testing.assert_close(sample(routed, clip), plain_first, atol=1e-6, rtol=1e-6)


def test_sigma_ranges_gate_the_node_and_each_reference(sd15):
    """A reference outside its start/end window adds nothing at that step; outside the node's
    window the layer is plain text attention."""
    model, clip, adapter, _, _ = sd15
    first = encoded(adapter, "dog", 0)
    late = encoded(adapter, "cat", 1, start=0.5)
    sampling = model.get_model_object("model_sampling")
    early_sigma, late_sigma = (float(sampling.percent_to_sigma(p)) for p in (0.2, 0.8))
    location = ("input", 1, 0)
    patch_of = lambda m: m.model_options["transformer_options"]["patches_replace"]["attn2"][location]
    both = patch_of(apply(model, adapter, (first, late), clip, "sum"))
    alone = patch_of(apply(model, adapter, (first,), clip, "sum"))
    windowed = patch_of(MultiRefApplyAdapter().apply(model, adapter, (first, late), clip, "sum",
                                                     0.8, 0.5, 1.0)[0])
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 12, 32, generator=g) for _ in range(3))
    options = lambda sigma: {"n_heads": 4, "original_shape": [2, 4, 6, 8], "block": ("input", 1),
                             "sigmas": torch.full((2,), sigma), "cond_or_uncond": [0, 1]}
    assert torch.equal(both(q, k, v, options(early_sigma)), alone(q, k, v, options(early_sigma)))
    assert not torch.allclose(both(q, k, v, options(late_sigma)), alone(q, k, v, options(late_sigma)))
    text = unet_family.host_attention_call(q, k, v, options(early_sigma))
    assert torch.equal(windowed(q, k, v, options(early_sigma)), text)
    assert not torch.equal(windowed(q, k, v, options(late_sigma)), text)
    # Weighted and mask routing: a gated-off reference (with more views, so more padding) is
    # out of the normalization too; the others equal a node holding them alone, bit for bit.
    wide_late = encoded(adapter, "cat", 1, views=2, start=0.5)
    third = encoded(adapter, "hat", 2)
    masks = torch.rand(3, 4, 6, generator=g)
    for mode, kw, kw_pair in (("weighted", {}, {}),
                              ("mask", {"region_masks": masks}, {"region_masks": masks[[0, 2]]})):
        trio = patch_of(apply(model, adapter, (first, wide_late, third), clip, mode, **kw))
        pair = patch_of(apply(model, adapter, (first, third), clip, mode, **kw_pair))
        assert torch.equal(trio(q, k, v, options(early_sigma)), pair(q, k, v, options(early_sigma)))
        assert not torch.allclose(trio(q, k, v, options(late_sigma)),
                                  pair(q, k, v, options(late_sigma)))


def test_bad_inputs_are_refused_with_clear_errors(sd15):
    model, clip, adapter, _, _ = sd15
    refs = tuple(encoded(adapter, p, i) for i, p in enumerate(["dog", "cat"]))
    with pytest.raises(ValueError, match="phrases: 3 phrases for 2 references"):
        apply(model, adapter, refs, clip, phrases="dog, cat, hat")
    with pytest.raises(ValueError, match="phrase of reference 2.*gives no tokens"):
        apply(model, adapter, refs, clip, phrases="dog,   ")
    other = tiny_adapter(model, seed=9)
    with pytest.raises(ValueError, match="reference 1 was encoded with another adapter"):
        apply(model, other, refs, clip)
    with pytest.raises(ValueError, match="region_masks: 1 masks for 2 references"):
        apply(model, adapter, refs, clip, "mask", region_masks=torch.ones(1, 48, 80))
    with pytest.raises(ValueError, match="clip: the text encoder gives width 48"):
        apply(model, adapter, refs, tiny_models.tiny_text_encoder("sdxl"))
    with pytest.raises(ValueError, match="model: carries no routing"):
        MultiRefRoutingMaps().show(model, {"samples": torch.zeros(1, 4, 6, 8)}, 0, "all")


def test_a_run_that_starts_below_the_last_ones_sigma_is_a_new_run(sd15):
    """Sampling in two parts (steps 0-1, then step 3 of the same schedule): the second run starts
    at a lower sigma than the first ended, which the sigmas alone take for the same run. Where
    the host says when a run starts (current ComfyUI's ON_PRE_RUN), the maps are the second
    run's alone; the installable host has no such hook."""
    model, clip, adapter, _, _ = sd15
    if not hasattr(model, "add_callback"):
        pytest.skip("the installable host has no run hook; runs are told from the sigmas there")
    refs = tuple(encoded(adapter, p, i) for i, p in enumerate(["dog", "cat"]))
    patched = apply(model, adapter, refs, clip, "weighted")
    cond, _ = clip.encode_from_tokens(clip.tokenize("a dog and a cat"), return_pooled=True)
    noise = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    recorder = patched.model_options["transformer_options"][RECORDER_KEY]
    for start, last in ((None, 2), (3, None)):
        comfy.sample.sample(patched, noise, 4, 5.0, "euler", "normal", [[cond, {}]],
                            [[torch.zeros_like(cond), {}]], torch.zeros(1, 4, 6, 10), seed=0,
                            start_step=start, last_step=last, disable_pbar=True)
    layers = len(unet_family.attention_locations(patched))
    assert recorder.steps == 1  # the second run's one step, not the first run's two
    assert sum(count for _, count in recorder.sums.values()) == layers  # one evaluation's layers
