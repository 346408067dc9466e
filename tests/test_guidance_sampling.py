"""The normalized-guidance GUIDER on the tiny real UNet, through the host's real sampler
(`guider.sample(noise, latent, sampler, sigmas, ...)`, exactly as SamplerCustomAdvanced calls it)."""
import math
import os

import pytest
import torch

import comfy.samplers
from multiref.kernels import guidance
from multiref.nodes import guidance as guidance_nodes
from multiref.families import unet as unet_family
from multiref.families import tiny_models

STEPS = 3
SHAPE = (1, 4, 6, 10)


def _conds():
    clip = tiny_models.tiny_text_encoder("sd15")
    positive = clip.encode_from_tokens(clip.tokenize("a photo of a dog"))
    negative = clip.encode_from_tokens(clip.tokenize("blurry"))
    return positive, negative


POSITIVE, NEGATIVE = _conds()


class ImageCondition:
    """A stand-in for the adapter: image-conditioned rows (full, image) also attend to a few
    fixed 'image tokens' in every cross-attention; uncond rows do not. Records what it saw."""

    def __init__(self):
        self.seen = []

    def install(self, model):
        self.widths = {}
        unet = model.model.diffusion_model
        for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                             ("output", unet.output_blocks)):
            for block_id, block in enumerate(blocks):
                for layer in block:
                    for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                        self.widths[(name, block_id, index)] = transformer.attn2.to_q.out_features
        unet_family.set_attention_patch(model, "attn2", self.make_patch)

    def width(self, location):
        return self.widths[location]

    def make_patch(self, location, inner):
        gen = torch.Generator().manual_seed(len(location[0]) + 10 * location[1])
        tokens = torch.randn((1, 4, self.width(location)), generator=gen)

        def patch(q, k, v, extra_options):
            roles = unet_family.row_roles(extra_options, q.shape[0])
            self.seen.append({"location": location, "roles": roles, "batch": q.shape[0],
                              "cond_or_uncond": list(extra_options["cond_or_uncond"]),
                              "branches": extra_options.get(unet_family.BRANCHES_KEY)})
            out = inner(q, k, v, extra_options)
            rows = unet_family.rows_with_role(roles, unet_family.IMAGE_ROLES)
            if rows:
                image = tokens.to(q).expand(len(rows), -1, -1)
                extra = unet_family.host_attention_call(q[rows], image, image, extra_options)
                out = out.clone()
                out[rows] += extra
            return out
        return patch


class CallRecorder:
    """A UNet function wrapper that keeps every model call: its chunks, contexts and outputs."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self  # model.clone() deep-copies model options: keep recording into this one

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.calls.append({"sigma": float(args["timestep"][0]), "batch": out.shape[0],
                           "cond_or_uncond": list(args["cond_or_uncond"]),
                           "context": args["c"]["c_crossattn"].clone(), "out": out.clone()})
        return out

    def branch_outputs(self, call):
        """{cond index: prediction} of one call."""
        chunks = call["out"].chunk(len(call["cond_or_uncond"]))
        return dict(zip(call["cond_or_uncond"], chunks))


def _model(image_condition=None, recorder=None, seed=0):
    model = tiny_models.tiny_unet("sd15", seed).clone()
    if image_condition is not None:
        image_condition.install(model)
    if recorder is not None:
        model.set_model_unet_function_wrapper(recorder)
    return model


def _sigmas(model, steps=STEPS):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def _sample(guider, model, sampler="euler", steps=STEPS):
    denoised = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = guider.sample(noise, torch.zeros(SHAPE), comfy.samplers.sampler_object(sampler),
                        _sigmas(model, steps), callback=lambda i, x0, x, total: denoised.append(x0),
                        disable_pbar=True, seed=0)
    return out, denoised


def _guider(model, text_scale=5.0, image_scale=3.0, ramp=0.0, normalize=True,
            mode=guidance_nodes.THREE_BRANCH):
    guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
        model, [[POSITIVE, {}]], [[NEGATIVE, {}]], text_scale, image_scale, ramp, normalize, mode)[0]
    assert isinstance(guider, comfy.samplers.CFGGuider)
    return guider


def test_one_call_per_step_with_full_image_uncond_rows():
    condition, recorder = ImageCondition(), CallRecorder()
    model = _model(condition, recorder)
    _sample(_guider(model), model)
    assert len(recorder.calls) == STEPS  # euler: one model call per step carries all branches
    for call in recorder.calls:
        assert call["batch"] == 3 and sorted(call["cond_or_uncond"]) == [0, 1, 2]
        # The rows carry the right text: full = prompt, image-only and uncond = negative prompt.
        for index, context in zip(call["cond_or_uncond"], call["context"].chunk(3)):
            expected = POSITIVE if index == 0 else NEGATIVE
            assert torch.equal(context, expected.to(context))
    assert {s["location"] for s in condition.seen} == set(unet_family.attention_locations(model))
    for seen in condition.seen:
        assert seen["branches"] == ("full", "image", "uncond")
        role_of = {0: "full", 1: "image", 2: "uncond"}
        assert seen["roles"] == tuple(role_of[i] for i in seen["cond_or_uncond"])
    # The image condition really reaches the image-only branch and not the uncond one.
    outputs = recorder.branch_outputs(recorder.calls[0])
    assert not torch.equal(outputs[1], outputs[2])


def test_reference_rows_ride_in_the_same_call():
    condition, recorder = ImageCondition(), CallRecorder()
    model = _model(condition, recorder)

    def two_references(x, timestep, c, roles):
        full = unet_family.rows_with_role(roles, "full")
        return torch.zeros(2, *x.shape[1:]), [full[0], full[0]], "refs"

    unet_family.add_row_provider(model, two_references)
    _sample(_guider(model), model)
    assert len(recorder.calls) == STEPS
    assert all(call["batch"] == 3 for call in recorder.calls)  # reference rows sliced off again
    inside = [s for s in condition.seen if s["location"] == ("middle", 0, 0)]
    assert len(inside) == STEPS
    for seen in inside:
        assert seen["batch"] == 5
        assert sorted(seen["roles"][:3]) == ["full", "image", "uncond"]
        assert seen["roles"][3:] == ("ref", "ref")


def _tiny_adapter_model(model):
    """The pack's MultiRefApplyAdapter (sum mode, one reference) with a random-weight adapter in
    the published key layout, sized for the tiny UNet."""
    from multiref.kernels.adapter import build_adapter
    from multiref.kernels.adapter import published_order
    from multiref.kernels.checkpoints import cross_attention_dims
    from multiref.kernels.references import EncodedReference
    from multiref.nodes.routing import MultiRefApplyAdapter
    gen = torch.Generator().manual_seed(5)
    dims = cross_attention_dims(model.model.diffusion_model)
    context = tiny_models.SD15_CONTEXT
    tensors = {"image_proj.proj.weight": torch.randn(4 * context, 24, generator=gen),
               "image_proj.proj.bias": torch.zeros(4 * context),
               "image_proj.norm.weight": torch.ones(context),
               "image_proj.norm.bias": torch.zeros(context)}
    for n, location in enumerate(published_order(dims)):
        ctx, inner = dims[location]
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * n + 1}.{name}.weight"] = torch.randn(inner, ctx, generator=gen)
    adapter = build_adapter("ip_adapter", "sd15", tensors, source="test")
    reference = EncodedReference(
        image_tokens=torch.randn(1, 4, context, generator=gen),
        uncond_tokens=torch.randn(1, 4, context, generator=gen), latents=None, masks=None,
        phrase="dog", weight=1.0, start_percent=0.0, end_percent=1.0,
        adapter_fingerprint=adapter.fingerprint)
    return MultiRefApplyAdapter().apply(model, adapter, (reference,), None, "sum", 1.0, 0.0, 1.0)[0]


def test_the_adapter_conditions_exactly_the_full_and_image_rows():
    """With the pack's adapter: the image-only branch is the adapter's prediction for the
    negative prompt with the reference, the uncond branch has no reference (the adapter's uncond
    tokens) and the full branch has prompt + reference: each equals the matching row of the
    host's own CFG call on the first step (same input there)."""
    model = _tiny_adapter_model(tiny_models.tiny_unet("sd15", 0))

    def first_call(guider):
        recorder = CallRecorder()
        recorded = model.clone()
        recorded.set_model_unet_function_wrapper(recorder)
        guider.model_patcher = recorded
        guider.model_options = recorded.model_options
        _sample(guider, recorded, steps=1)
        return recorder.branch_outputs(recorder.calls[0])

    ours = first_call(_guider(model))
    prompt_cfg = first_call(_host_cfg(model, 5.0))  # [prompt, negative]: full, uncond
    negative_cfg = _host_cfg(model, 5.0)
    negative_cfg.set_conds([[NEGATIVE, {}]], [[NEGATIVE, {}]])  # full row = negative + image
    negative_with_image = first_call(negative_cfg)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    close(ours[0], prompt_cfg[0])
    close(ours[1], negative_with_image[0])
    close(ours[2], prompt_cfg[1])
    assert (ours[1] - ours[2]).abs().max() > 1e-2  # the reference really changes the image row


def test_msa_references_ride_once_and_serve_both_image_branches():
    """The pack's MSA with K = 2 references: one call per step carries uncond, image-only, full
    and the K reference rows once (shared by both image-conditioned branches)."""
    from multiref.kernels.references import EncodedReference
    from multiref.nodes.msa import apply_msa
    gen = torch.Generator().manual_seed(6)
    references = tuple(EncodedReference(
        image_tokens=torch.zeros(1, 4, 16), uncond_tokens=torch.zeros(1, 4, 16),
        latents=torch.randn(1, 4, *SHAPE[2:], generator=gen),
        masks=(torch.rand(1, *SHAPE[2:], generator=gen) < 0.5).float(), phrase="dog", weight=1.0,
        start_percent=0.0, end_percent=1.0, adapter_fingerprint="") for _ in range(2))
    recorder, seen = CallRecorder(), []

    def record(q, k, v, extra_options):
        seen.append(unet_family.row_roles(extra_options, q.shape[0]))
        return unet_family.host_attention_call(q, k, v, extra_options)

    # The recorder goes on first: MSA's row wrapper keeps it and adds its rows inside it.
    model = apply_msa(_model(recorder=recorder), references, 1.0, 0.0, 1.0, False, "all",
                      "references")
    model.set_model_attn2_replace(record, "middle", 0, 0)
    _sample(_guider(model), model)
    assert [call["batch"] for call in recorder.calls] == [3] * STEPS
    assert len(seen) == STEPS
    for roles in seen:
        assert sorted(roles[:3]) == ["full", "image", "uncond"] and roles[3:] == ("ref", "ref")
    outputs = recorder.branch_outputs(recorder.calls[0])
    assert (outputs[1] - outputs[2]).abs().max() > 1e-3  # the image-only row read the references


def _solve_image_scale(u, i, f, text_scale, result):
    """The s_I that makes `result` eq. 4 of (u, i, f), by least squares along the rescaled d_img
    (written out here, independently of the kernel)."""
    d_img, d_txt = (i - u).double(), (f - i).double()
    n_img, n_txt = d_img.norm().item(), d_txt.norm().item()
    m = min(n_img, n_txt)
    d_img = d_img * min(1.0, m / n_img)
    d_txt = d_txt * min(1.0, m / n_txt)
    rest = result.double() - i.double() - text_scale * d_txt
    return float((rest * d_img).sum() / (d_img * d_img).sum())


def test_image_scale_follows_the_ramp_step_by_step():
    """Ramp from 0: the first step has image scale 0 and runs two branches only; every later
    step's output is eq. 4 at the scheduled image scale, read back from the output."""
    recorder = CallRecorder()
    model = _model(ImageCondition(), recorder)
    text_scale, start, ramp = 4.0, 0.0, 6.0
    _, denoised = _sample(_guider(model, text_scale, start, ramp), model)
    assert [call["batch"] for call in recorder.calls] == [2] + [3] * (STEPS - 1)
    assert len(denoised) == STEPS
    first = recorder.branch_outputs(recorder.calls[0])
    torch.testing.assert_close(denoised[0], guidance.two_branch_guidance(
        first[1], first[0], text_scale, normalize=True))
    for step in range(1, STEPS):
        out, result = recorder.branch_outputs(recorder.calls[step]), denoised[step]
        scheduled = start + ramp * step / (STEPS - 1)
        used = _solve_image_scale(out[2], out[1], out[0], text_scale, result)
        assert math.isclose(used, scheduled, rel_tol=1e-3, abs_tol=1e-3)
        torch.testing.assert_close(result, guidance.normalized_guidance(
            out[2], out[1], out[0], text_scale, scheduled))


def test_image_scale_ramps_over_the_timestep_as_syncd():
    """image_scale_ramp_over 'timestep': at the model's discrete timestep t the image scale is
    s0 + a * (1000 - t) / 1000 (SynCD's _get_image_adapter_scale), read back from the output;
    the schedule here sits exactly on the model's own sigmas of timesteps 999, 600 and 200."""
    recorder = CallRecorder()
    model = _model(ImageCondition(), recorder)
    text_scale, start, ramp = 4.0, 2.0, 6.0
    guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
        model, [[POSITIVE, {}]], [[NEGATIVE, {}]], text_scale, start, ramp, True,
        guidance_nodes.THREE_BRANCH, "timestep")[0]
    table = model.get_model_object("model_sampling").sigmas
    timesteps = (999, 600, 200)
    sigmas = torch.cat([table[list(timesteps)], torch.zeros(1)])
    denoised = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(SHAPE), comfy.samplers.sampler_object("euler"), sigmas,
                  callback=lambda i, x0, x, total: denoised.append(x0), disable_pbar=True, seed=0)
    for step, t in enumerate(timesteps):
        out = recorder.branch_outputs(recorder.calls[step])
        expected = start + ramp * (1000 - t) / 1000
        used = _solve_image_scale(out[2], out[1], out[0], text_scale, denoised[step])
        assert math.isclose(used, expected, rel_tol=1e-3, abs_tol=1e-3), (t, used, expected)
    with pytest.raises(ValueError, match="image_scale_ramp_over"):
        guidance_nodes.MultiRefGuider(model, 1.0, 1.0, 0.0, True, "three-branch", "sigma")


def _host_cfg(model, cfg):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[POSITIVE, {}]], [[NEGATIVE, {}]])
    guider.set_cfg(cfg)
    return guider


def test_image_scale_zero_and_two_branch_mode_are_the_host_cfg():
    model = _model(ImageCondition())
    expected, _ = _sample(_host_cfg(model, 6.0), model)
    for guider in (_guider(model, 6.0, 0.0, 0.0, normalize=False),
                   _guider(model, 6.0, 5.0, 2.0, normalize=False, mode=guidance_nodes.TWO_BRANCH)):
        out, _ = _sample(guider, model)
        assert torch.equal(out, expected)


def test_two_branch_normalized_is_the_capped_cfg():
    recorder = CallRecorder()
    model = _model(ImageCondition(), recorder)
    _, denoised = _sample(_guider(model, 9.0, normalize=True, mode=guidance_nodes.TWO_BRANCH), model)
    for call, result in zip(recorder.calls, denoised):
        out = recorder.branch_outputs(call)
        guided = out[1] + 9.0 * (out[0] - out[1])
        expected = guided * min(1.0, (out[0].norm() / guided.norm()).item())
        torch.testing.assert_close(result, expected)


def test_without_image_condition_text_guidance_survives():
    """No adapter/MSA on the model: i == u, and eq. 4 would cancel the text guidance; the
    guider falls back to text-only CFG (warning once) instead of returning the uncond."""
    model = _model()
    expected, _ = _sample(_host_cfg(model, 6.0), model)
    out, _ = _sample(_guider(model, 6.0, 4.0, normalize=False), model)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    # Normalized, where eq. 4 would cancel the text guidance, the fallback is the capped CFG.
    capped, _ = _sample(_guider(model, 6.0, 4.0, normalize=True), model)
    two_branch, _ = _sample(_guider(model, 6.0, 0.0, 0.0, normalize=True), model)
    torch.testing.assert_close(capped, two_branch, rtol=1e-4, atol=1e-4)


def test_an_image_branch_within_rounding_of_uncond_counts_as_no_image_condition():
    """Same inputs at another batch position may differ in the last bits on some CPUs."""
    u = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    i = u.clone()
    i[0] += 1e-7 * u[0].abs().max()  # rounding-sized difference: still no image condition
    i[1] += 1e-2 * u[1]              # a real image effect
    assert guidance.lacks_image_condition(u, i).flatten().tolist() == [True, False]


def test_mode_is_checked():
    try:
        guidance_nodes.MultiRefGuider(_model(), 5.0, 3.0, 0.0, True, "three")
    except ValueError as error:
        assert "mode" in str(error) and "two-branch" in str(error)
    else:
        raise AssertionError("an unknown mode was accepted")


def _saved_latent(host, ui):
    import safetensors.torch
    entry = ui["latents"][0]
    path = os.path.join(host.folder_paths.get_output_directory(), entry["subfolder"], entry["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def test_nodes_run_in_a_prompt_and_the_all_in_one_sampler_matches_the_guider(host):
    """API prompt through the host's executor: guider + core SamplerCustomAdvanced and the
    all-in-one MultiRefSampler give the same latent for the same seed and settings."""
    scales = {"text_scale": 5.0, "image_scale": 3.0, "image_scale_ramp": 2.0, "normalize": True,
              "mode": "three-branch"}
    prompt = {
        "models": {"class_type": "MultiRefTinyDemoModels", "inputs": {"family": "sd15", "seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": "a dog"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "guider": {"class_type": "MultiRefNormalizedCFGGuider", "inputs": dict(
            model=["models", 0], positive=["pos", 0], negative=["neg", 0], **scales)},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {
            "model": ["models", 0], "scheduler": "normal", "steps": STEPS, "denoise": 1.0}},
        "custom": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "simple": {"class_type": "MultiRefSampler", "inputs": dict(
            model=["models", 0], seed=7, steps=STEPS, sampler_name="euler", scheduler="normal",
            positive=["pos", 0], negative=["neg", 0], latent_image=["latent", 0], denoise=1.0,
            **scales)},
        "save_custom": {"class_type": "SaveLatent", "inputs": {
            "samples": ["custom", 0], "filename_prefix": "guidance_test/custom"}},
        "save_simple": {"class_type": "SaveLatent", "inputs": {
            "samples": ["simple", 0], "filename_prefix": "guidance_test/simple"}},
    }
    outputs = host.execute(prompt)
    custom = _saved_latent(host, outputs["save_custom"])
    simple = _saved_latent(host, outputs["save_simple"])
    assert custom.shape == (1, 4, 6, 8) and torch.isfinite(custom).all()
    assert torch.equal(custom, simple)
