"""MultiRef Apply MSA on the tiny Flux (families/flux.py, nodes/msa_flux.py) through the host's
real sampler: off is the unpatched model, uncond and reference rows are left exactly as they
were, the compacted shared attention equals a dense masked softmax in float64, one model call
per step for three branches and the references, an attention override installed before ours
still runs and nothing of ours stays after a run; Kontext mode against core ReferenceLatent;
a Flux the hooks cannot reach is refused by name."""
import math

import pytest
import torch

import comfy.sample
import comfy.samplers
from conftest import HOST
from multiref.kernels.references import EncodedReference

needs_flux = pytest.mark.skipif(HOST.kind == "installable comfyui", reason=(
    "Flux needs a current ComfyUI (run with MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)"))

STEPS = 2
LATENT = (8, 12)  # 64 x 96 px; packed grid 4 x 6


@pytest.fixture(scope="module")
def parts():
    from multiref.families import tiny_dit_models
    return (tiny_dit_models.tiny_dit("flux", 0), tiny_dit_models.tiny_dit_text_encoder("flux", 1),
            tiny_dit_models.tiny_vae16(3))


def _encoded(vae, count, weights=None, seed=10, ones=False):
    """`count` references; the second one has two views (two reference rows)."""
    gen = torch.Generator().manual_seed(seed)
    refs = []
    for n in range(count):
        views = 2 if n == 1 else 1
        images = torch.rand(views, 8 * LATENT[0], 8 * LATENT[1], 3, generator=gen)
        mask = torch.ones(views, *LATENT) if ones else \
            (torch.rand(views, *LATENT, generator=gen) < 0.5).float()
        mask[:, 2 * (n % 4)] = 1  # never empty on the packed grid
        refs.append(EncodedReference(
            image_tokens=torch.zeros(1, 4 * views, 16), uncond_tokens=torch.zeros(1, 4 * views, 16),
            latents=vae.encode(images), masks=mask, phrase=f"object {n}",
            weight=1.0 if weights is None else weights[n], start_percent=0.0, end_percent=1.0,
            adapter_fingerprint=""))
    return tuple(refs)


def _conds(clip, reference=None):
    import node_helpers
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if reference is not None:
        positive = node_helpers.conditioning_set_values(
            positive, {"reference_latents": list(reference)}, append=True)
    return positive, negative


def _sample(model, clip, cfg=2.0, reference=None):
    positive, negative = _conds(clip, reference)
    shape = (1, 16) + LATENT
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative,
                               torch.zeros(shape), seed=0, disable_pbar=True)


def _msa(model, refs, **kw):
    from multiref.nodes.msa import apply_msa
    options = dict(strength=1.0, start_percent=0.0, end_percent=1.0, first_step_unmasked=False,
                   layers="all", mode="references")
    options.update(kw)
    return apply_msa(model, refs, **options)


class _Calls:
    """A DIFFUSION_MODEL wrapper recording every call's inputs and output (the whole batch,
    reference rows included)."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, x, timestep, context, y, guidance, ref_latents, control,
                 transformer_options, **kwargs):
        out = executor(x, timestep, context, y, guidance, ref_latents, control,
                       transformer_options, **kwargs)
        self.calls.append(dict(x=x, timestep=timestep, context=context, y=y, guidance=guidance,
                               ref_latents=ref_latents, options=dict(transformer_options),
                               out=out, kwargs=kwargs, override_after=transformer_options.get(
                                   "optimized_attention_override", "none")))
        return out


def _recorded(model):
    from comfy.patcher_extension import WrappersMP
    calls = _Calls()
    model = model.clone()
    model.add_wrapper(WrappersMP.DIFFUSION_MODEL, calls)
    return model, calls


def _unpatched(model, call):
    """The same call on the bare diffusion model (no patch, no wrapper)."""
    with torch.no_grad():
        return model.model.diffusion_model(call["x"], call["timestep"], call["context"],
                                           y=call["y"], guidance=call["guidance"],
                                           ref_latents=call["ref_latents"],
                                           transformer_options={}, **call["kwargs"])


@needs_flux
def test_strength_zero_is_the_unpatched_model(parts, one_thread):
    model, clip, vae = parts
    patched = _msa(model, _encoded(vae, 2), strength=0.0)
    assert "dit" not in patched.model_options.get("transformer_options", {}).get(
        "patches_replace", {})
    assert torch.equal(_sample(patched, clip), _sample(model, clip))


@needs_flux
@pytest.mark.parametrize("noise", ["noised", "clean"])
def test_uncond_and_reference_rows_are_unchanged(parts, noise, one_thread):
    model, clip, vae = parts
    refs = _encoded(vae, 2)
    patched, calls = _recorded(_msa(model, refs, reference_noise=noise))
    _sample(patched, clip)
    assert len(calls.calls) == STEPS
    for call in calls.calls:
        roles = call["options"]["multiref_roles"]
        assert sorted(roles[:2]) == ["full", "uncond"] and roles[2:] == ("ref",) * 3  # 1 + 2 views
        plain = _unpatched(model, call)
        for row, role in enumerate(roles):
            if role == "full":
                assert not torch.allclose(call["out"][row], plain[row], atol=1e-4)
            else:
                assert torch.equal(call["out"][row], plain[row]), role
    first = calls.calls[0]["x"][2:]
    if noise == "clean":  # the clean latents themselves (the first view of each reference)
        expected = model.model.process_latent_in(refs[0].latents.float())
        assert torch.equal(first[:1], expected)
    else:
        assert not torch.allclose(first[:1], model.model.process_latent_in(refs[0].latents))


def _instrument(patched):
    """Wrap every installed joint-attention patch so a test sees its q, k, v, options, output."""
    seen = []
    for location, replace in patched.model_options["transformer_options"]["patches_replace"][
            "dit"].items():
        wrapped = []
        for original in replace.patches:
            def recording(q, k, v, extra_options, original=original, location=location):
                out = original(q, k, v, extra_options)
                kontext_call = original.rows.call if hasattr(original, "rows") else \
                    original.state.call
                seen.append((location, q, k, v, extra_options, out, original, kontext_call))
                return out
            wrapped.append(recording)
        replace.patches = tuple(wrapped)
    return seen


def _rotate_by_host(x, delta, flux):
    """Keys rotated at p moved to p + delta, by the host's own RoPE (its pe of the delta ids)."""
    from comfy.ldm.flux.math import apply_rope1
    ids = torch.tensor(delta, dtype=torch.float32)[None, None]
    pe = flux.pe_embedder(ids)  # (1, 1, 1, D/2, 2, 2)
    return apply_rope1(x.float(), pe[:, :, 0][:, None])


@needs_flux
def test_compacted_shared_attention_equals_a_dense_masked_softmax(parts, one_thread):
    """At every patched block: the full row's image queries read [own text | own image | the
    foreground of every reference row, moved below the target], each token of a reference of
    weight w counting w times; its text queries read their own row only. The reference is a
    dense L x L' masked softmax in float64, positions moved by the host's own RoPE."""
    model, clip, vae = parts
    refs = _encoded(vae, 2, weights=(2.0, 0.5))
    patched = _msa(model, refs)
    seen = _instrument(patched)
    positive, negative = _conds(clip)
    _sample(patched, clip)
    flux = model.model.diffusion_model
    rows, cols = LATENT[0] // 2, LATENT[1] // 2
    n = rows * cols
    # Foreground on the packed grid: the top-left latent pixel of each 2 x 2 patch (nearest).
    fg = torch.cat([ref.masks[:, ::2, ::2].reshape(ref.masks.shape[0], -1) > 0 for ref in refs])
    weights = torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)  # per reference row
    assert len(seen) == STEPS * (len(flux.double_blocks) + len(flux.single_blocks))
    for location, q, k, v, options, out, patch, kontext_call in seen:
        text = options["multiref_text_len"]
        start, end = options["multiref_rows"]["msa"]
        d = q.shape[-1]
        ref_keys, ref_values, bias = [], [], []
        for r in range(end - start):
            delta = (0.0, float(rows * (r + 1)), 0.0)  # each reference row below the previous
            ref_keys.append(_rotate_by_host(k[start + r:start + r + 1, :, text:text + n], delta,
                                            flux))
            ref_values.append(v[start + r:start + r + 1, :, text:text + n])
            bias.append(torch.where(fg[r], math.log(weights[r]), -math.inf))
        full = options["multiref_roles"].index("full")
        q, k, v, out = q[full:full + 1], k[full:full + 1], v[full:full + 1], out[full:full + 1]
        keys = torch.cat([k.double()] + [x.double() for x in ref_keys], dim=2)
        values = torch.cat([v.double()] + [x.double() for x in ref_values], dim=2)
        length = q.shape[2]
        offset = torch.zeros(length, keys.shape[2], dtype=torch.float64)
        offset[:text, length:] = -math.inf
        offset[text:, length:] = torch.cat(bias).double()
        logits = q.double() @ keys.transpose(-1, -2) / math.sqrt(d) + offset
        dense = (logits.softmax(-1) @ values).transpose(1, 2).reshape(1, length, -1)
        torch.testing.assert_close(out.double(), dense, rtol=1e-4, atol=1e-5)


@needs_flux
def test_one_model_call_per_step_with_three_branches(parts, one_thread):
    from multiref.nodes import guidance as guidance_nodes
    model, clip, vae = parts
    refs = _encoded(vae, 2)
    patched, calls = _recorded(_msa(model, refs))
    positive, negative = _conds(clip)
    guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
        patched, positive, negative, 2.0, 1.5, 0.0, True, "three-branch")[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                             STEPS)
    noise = torch.randn((1, 16) + LATENT, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                  disable_pbar=True, seed=0)
    assert [call["x"].shape[0] for call in calls.calls] == [3 + 3] * STEPS
    for call in calls.calls:
        roles = call["options"]["multiref_roles"]
        assert sorted(roles[:3]) == ["full", "image", "uncond"] and roles[3:] == ("ref",) * 3


@needs_flux
def test_an_override_installed_before_still_runs_and_nothing_of_ours_stays(parts, one_thread):
    model, clip, vae = parts
    counted = []

    def earlier_override(func, *args, **kwargs):
        counted.append(args[0].shape[0])
        return func(*args, **kwargs)

    with_override = model.clone()
    with_override.model_options.setdefault("transformer_options", {})[
        "optimized_attention_override"] = earlier_override
    before = _sample(with_override, clip)
    blocks = len(model.model.diffusion_model.double_blocks) + len(
        model.model.diffusion_model.single_blocks)
    assert counted == [2] * (STEPS * blocks)
    counted.clear()
    module_state = dict(vars(model.model.diffusion_model))
    patched = _msa(with_override, _encoded(vae, 1))
    state = [r for r in patched.model_options["transformer_options"]["patches_replace"]["dit"]
             .values()][0].patches[0].state
    recorded, calls = _recorded(patched)
    _sample(recorded, clip)
    # After each model call the options hold the earlier override again, not ours.
    assert [call["override_after"] for call in calls.calls] == [earlier_override] * STEPS
    # Every block's attention still went through the earlier override, reference rows included.
    assert counted == [3] * (STEPS * blocks)
    options = patched.model_options["transformer_options"]
    assert options["optimized_attention_override"] is earlier_override
    assert state.call is None  # the run's state is dropped when the host cleans up
    assert dict(vars(model.model.diffusion_model)) == module_state
    counted.clear()
    assert torch.equal(_sample(with_override, clip), before)


def _kontext_reference(vae):
    return vae.encode(torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4)))


@needs_flux
def test_kontext_all_ones_weight_one_unblocked_is_core_reference_latent(parts, one_thread):
    model, clip, vae = parts
    reference = _kontext_reference(vae)
    refs = _encoded(vae, 1, ones=True)
    patched = _msa(model, refs, mode="kontext", block_ref_to_target=False)
    plain = _sample(model, clip, reference=[reference])
    assert torch.equal(_sample(patched, clip, reference=[reference]), plain)
    # A mask on the reference (or blocking) changes it.
    masked = _msa(model, _encoded(vae, 1), mode="kontext",
                  block_ref_to_target=False)
    assert not torch.equal(_sample(masked, clip, reference=[reference]), plain)


@needs_flux
@pytest.mark.parametrize("block", [True, False])
def test_kontext_blocking_keeps_references_from_reading_the_target(parts, block, one_thread):
    """Checked on the attention probabilities: with v the indicator of the target's tokens, an
    attention output is the probability mass its query puts on them."""
    model, clip, vae = parts
    reference = _kontext_reference(vae)
    patched = _msa(model, _encoded(vae, 1, weights=(1.5,)), mode="kontext",
                   block_ref_to_target=block)
    seen = _instrument(patched)
    _sample(patched, clip, cfg=1.0, reference=[reference])
    assert seen
    for location, q, k, v, options, out, patch, kontext_call in seen:
        text = options["multiref_text_len"]
        target = LATENT[0] // 2 * (LATENT[1] // 2)
        indicator = torch.zeros_like(v)
        indicator[:, :, text:text + target] = 1.0
        inner = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v).transpose(1, 2).flatten(2)
        patch.rows.call = kontext_call  # the run's, dropped when the run ended
        probs = patch(q, k, indicator, dict(options, multiref_inner=inner))
        on_target = probs[:, text + target:].reshape(-1)  # the reference queries, every head
        if block:
            assert torch.equal(on_target, torch.zeros_like(on_target))
        else:
            assert bool((on_target > 0).all())
        # The target's image queries read the target and the reference's foreground.
        assert bool((probs[:, text:text + target] < 1).all())


@needs_flux
def test_a_flux_the_hooks_cannot_reach_is_refused_by_name(parts):
    from comfy.ldm.flux.model import Flux
    from multiref.families import tiny_dit_models
    model = tiny_dit_models.tiny_dit("flux", 0)

    class OtherFlux(torch.nn.Module):  # e.g. a quantized implementation with its own forward
        def __init__(self, core):
            super().__init__()
            self.double_blocks, self.single_blocks = core.double_blocks, core.single_blocks

    class Wrapped(torch.nn.Module):  # e.g. an implementation that hides its blocks
        pass

    core = model.model.diffusion_model
    for other in (OtherFlux(core), Wrapped()):
        model.model.diffusion_model = other
        with pytest.raises(ValueError, match="model: Masked Shared Attention on Flux work through "
                                             "ComfyUI's own Flux model .*"
                                             f"{type(other).__name__}.*Load Diffusion Model"):
            _msa(model, _encoded(parts[2], 1))

    class ForwardReplaced(Flux):
        def forward_orig(self, *args, **kwargs):
            return super().forward_orig(*args, **kwargs)

    core = tiny_dit_models.tiny_dit("flux", 0)
    core.model.diffusion_model.__class__ = ForwardReplaced
    with pytest.raises(ValueError, match="model: .*forward_orig of this model was replaced"):
        _msa(core, _encoded(parts[2], 1))


def test_the_flux_family_provides_the_whole_seam():
    from multiref.families import base
    from multiref.families import flux as flux_family
    assert [name for name in base.SEAM if not hasattr(flux_family, name)] == []
    assert "all" in flux_family.BLOCK_GROUPS


@needs_flux
def test_a_reference_left_out_by_weight_or_window_leaves_the_model_unpatched(parts, one_thread):
    """Zero means off: weight 0, or a window no step falls in, adds no rows and no tokens."""
    import dataclasses
    model, clip, vae = parts
    plain = _sample(model, clip)
    (ref,) = _encoded(vae, 1)
    for off in (dataclasses.replace(ref, weight=0.0),
                dataclasses.replace(ref, start_percent=0.99, end_percent=1.0)):
        patched, calls = _recorded(_msa(model, (off,)))
        assert torch.equal(_sample(patched, clip), plain)
        assert {call["x"].shape[0] for call in calls.calls} == {2}


@needs_flux
@pytest.mark.parametrize("blocks", ["double", "single"])
def test_blocks_pick_the_patched_group(parts, blocks, one_thread):
    model, clip, vae = parts
    patched = _msa(model, _encoded(vae, 1), layers=blocks)
    seen = _instrument(patched)
    _sample(patched, clip)
    assert {entry[0][0] for entry in seen} == {f"{blocks}_block"}
    assert not torch.equal(_sample(patched, clip), _sample(model, clip))


@needs_flux
def test_unet_and_flux_options_are_refused_on_the_other_family(parts):
    from multiref.families import tiny_models
    model, clip, vae = parts
    with pytest.raises(ValueError, match="layers: 'down' names UNet blocks; on Flux use all, "
                                         "double or single"):
        _msa(model, _encoded(vae, 1), layers="down")
    with pytest.raises(ValueError, match="mode: 'batch' is not available on Flux"):
        _msa(model, _encoded(vae, 1), mode="batch")
    unet = tiny_models.tiny_unet("sd15")
    with pytest.raises(ValueError, match="layers: 'double' names Flux blocks"):
        _msa(unet, (), layers="double")
    with pytest.raises(ValueError, match="mode: 'kontext' .*on an SD1.5 / SDXL model use "
                                         "'references'"):
        _msa(unet, (), mode="kontext")


@needs_flux
def test_kontext_needs_one_reference_per_reference_latent(parts):
    model, clip, vae = parts
    patched = _msa(model, _encoded(vae, 2), mode="kontext")
    with pytest.raises(ValueError, match="references: kontext mode got 2 encoded references for "
                                         "1 reference latents"):
        _sample(patched, clip, reference=[_kontext_reference(vae)])


def test_reference_latents_node_encodes_latents_and_masks_only(host):
    """MultiRef Encode Reference Latents: the VAE's latents and the masks on the latent grid
    (a cell is foreground when at least half its 8 x 8 pixels are), no adapter tokens."""
    from multiref.families import tiny_models
    from multiref.kernels.references import Reference
    vae = tiny_models.tiny_vae()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 48, 64, 3, generator=gen)
    mask = (torch.rand(1, 48, 64, generator=gen) > 0.5).float()
    ref = Reference(images=image, masks=mask, phrase="cat", weight=0.5, start_percent=0.1,
                    end_percent=0.9)
    ((enc,),) = host.nodes["MultiRefEncodeReferenceLatents"]().encode([ref], vae, 0)
    assert enc.image_tokens.numel() == 0 and enc.adapter_fingerprint == ""
    assert enc.latents.shape == (1, 4, 6, 8)
    cells = mask.reshape(1, 6, 8, 8, 8).mean(dim=(2, 4))  # (view, row, 8 px, col, 8 px)
    assert torch.equal(enc.masks, (cells >= 0.5).float())
    assert (enc.weight, enc.start_percent, enc.end_percent, enc.phrase) == (0.5, 0.1, 0.9, "cat")


@needs_flux
def test_patches_compose_with_an_earlier_patch_and_another_nodes_block_replace(parts, one_thread):
    """Another node's `dit` replace and a patch installed earlier both still run under MSA's;
    as both pass through, the result is MSA's alone."""
    from multiref.families import flux as flux_family
    model, clip, vae = parts
    refs = _encoded(vae, 1)
    base = model.clone()
    replaced, earlier = [], []

    def other_node(args, extra):
        replaced.append(args["img"].shape[0])
        return extra["original_block"](args)

    def make(location, inner):
        def patch(q, k, v, extra_options):
            earlier.append(location)
            return inner(q, k, v, extra_options)
        return patch

    base.set_model_patch_replace(other_node, "dit", "single_block", 0)
    flux_family.set_attention_patch(base, "joint", make, "all")
    patched = _msa(base, refs, layers="single")
    result = _sample(patched, clip)
    blocks = model.model.diffusion_model
    assert replaced == [3] * STEPS  # full, uncond and the reference row
    assert len(earlier) == STEPS * (len(blocks.double_blocks) + len(blocks.single_blocks))
    assert torch.equal(result, _sample(_msa(model, refs, layers="single"), clip))


@needs_flux
def test_reference_rows_carry_the_kontext_references_too(parts, one_thread):
    """MSA's reference rows next to ReferenceLatent: the list conditioning gets a row per
    reference row, the reference rows stay exactly what the unpatched model gives them, and
    the generated row reads the references."""
    model, clip, vae = parts
    reference = _kontext_reference(vae)
    patched, calls = _recorded(_msa(model, _encoded(vae, 2)))
    _sample(patched, clip, cfg=1.0, reference=[reference])
    for call in calls.calls:
        assert call["options"]["multiref_roles"] == ("full", "ref", "ref", "ref")
        (latents,) = call["ref_latents"]
        assert latents.shape[0] == 4 and torch.equal(latents[1:], latents[:1].expand(3, -1, -1, -1))
        plain = _unpatched(model, call)
        assert torch.equal(call["out"][1:], plain[1:])
        assert not torch.allclose(call["out"][:1], plain[:1], atol=1e-4)


@needs_flux
def test_strength_blends_the_image_tokens_only(parts, one_thread):
    """At strength s the generated row's image tokens are (1 - s) plain + s shared attention;
    its text tokens keep the plain attention."""
    model, clip, vae = parts
    patched = _msa(model, _encoded(vae, 1), strength=0.25)
    seen = _instrument(patched)
    _sample(patched, clip, cfg=1.0)
    for location, q, k, v, options, out, patch, call in seen:
        text = options["multiref_text_len"]
        plain = options["multiref_inner"](q, k, v)
        patch.state.call, patch.strength = call, 1.0
        shared = patch(q, k, v, options)
        patch.strength = 0.25
        torch.testing.assert_close(out[:, text:], 0.75 * plain[:, text:] + 0.25 * shared[:, text:],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(out[:, :text], plain[:, :text])
        assert not torch.allclose(shared[:, text:], plain[:, text:], atol=1e-4)
