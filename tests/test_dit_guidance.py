"""Normalized three-branch guidance on a guidance-distilled model (tiny Flux through the host's
real sampler): true CFG on top of the distilled guidance embedding, all branches in one model
call, the first step unguided on request, only the full branch after cfg_end_percent; the same
on Flux without the embedding (schnell), which the guider treats like any other model."""
import pytest
import torch

import comfy.samplers
from conftest import HOST
from multiref.kernels import guidance
from multiref.nodes import guidance as guidance_nodes
from multiref.families import unet as unet_family

needs_flux = pytest.mark.skipif(HOST.kind == "installable comfyui", reason=(
    "Flux needs a current ComfyUI (run with MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)"))

STEPS = 5
SHAPE = (1, 16, 4, 6)


def _models(family):
    from multiref.families import tiny_dit_models
    return tiny_dit_models.tiny_dit(family, 0), tiny_dit_models.tiny_dit_text_encoder(family, 1)


class ImageRowsOffset:
    """A stand-in for an image condition: a dit block replace that moves the image tokens of the
    rows that carry references (full, image-only), so the image branch differs from uncond.
    The offset varies over channels (every later use of the tokens is layer-normalized)."""

    def __call__(self, args, extra):
        out = extra["original_block"](args)
        roles = unet_family.row_roles(args["transformer_options"], out["img"].shape[0])
        rows = unet_family.rows_with_role(roles, unet_family.IMAGE_ROLES)
        img = out["img"].clone()
        img[rows] += torch.linspace(-1.0, 1.0, img.shape[-1])
        return dict(out, img=img)


class Calls:
    """Every model call: its chunks, the distilled guidance of its rows and its predictions."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        self.calls.append({"sigma": float(args["timestep"][0]), "rows": out.shape[0],
                           "chunks": list(args["cond_or_uncond"]), "out": out.clone(),
                           "guidance": args["c"].get("guidance")})
        return out


def _run(family, skip_first_step, cfg_end_percent, text_scale=4.0, image_scale=2.0):
    model, clip = _models(family)
    model = model.clone()
    model.set_model_patch_replace(ImageRowsOffset(), "dit", "double_block", 0)
    calls = Calls()
    model.set_model_unet_function_wrapper(calls)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog"),
                                                 add_dict={"guidance": 2.5})
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
        model, positive, negative, text_scale, image_scale, 0.0, True,
        guidance_nodes.THREE_BRANCH, "steps", skip_first_step, cfg_end_percent)[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                             STEPS)
    denoised = []
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(SHAPE), comfy.samplers.sampler_object("euler"), sigmas,
                  callback=lambda i, x0, x, total: denoised.append(x0.clone()),
                  disable_pbar=True, seed=0)
    end_sigma = float(model.get_model_object("model_sampling").percent_to_sigma(cfg_end_percent))
    return calls.calls, denoised, sigmas, end_sigma


@needs_flux
@pytest.mark.parametrize("family", ["flux", "flux_schnell"])
def test_three_branches_one_call_first_step_unguided_then_full_branch_only(family, one_thread):
    calls, denoised, sigmas, end_sigma = _run(family, skip_first_step=True, cfg_end_percent=0.6)
    assert len(calls) == STEPS == len(denoised)  # one model call per step (euler)
    guided = [i > 0 and float(sigmas[i]) >= end_sigma for i in range(STEPS)]
    assert guided[0] is False and any(guided) and not all(guided[1:])  # each case occurs
    for step, (call, x0) in enumerate(zip(calls, denoised)):
        if not guided[step]:
            # The full branch alone: one row, the prompt (cond index 0), returned as it is.
            assert call["rows"] == 1 and call["chunks"] == [0]
            assert torch.equal(x0, call["out"])
            continue
        # full, image-only and uncond in ONE call (the host orders the chunks as it likes).
        assert call["rows"] == 3 and sorted(call["chunks"]) == [0, 1, 2]
        branch = dict(zip(call["chunks"], call["out"].chunk(3)))
        full, image, uncond = branch[0], branch[1], branch[2]
        assert not torch.allclose(image, uncond)  # the stand-in image condition acts
        expected = guidance.normalized_guidance(uncond.double(), image.double(), full.double(),
                                                4.0, 2.0)
        torch.testing.assert_close(x0.double(), expected, rtol=1e-5, atol=1e-6)
        # True CFG on top of ONE distilled guidance: the negative rows carry the positive's.
        assert torch.equal(call["guidance"], torch.full_like(call["guidance"], 2.5))


@needs_flux
def test_without_the_options_every_step_is_guided(one_thread):
    calls, _, _, _ = _run("flux", skip_first_step=False, cfg_end_percent=1.0)
    assert [call["rows"] for call in calls] == [3] * STEPS


def test_distilled_guidance_of_the_positive_goes_to_the_negative():
    positive = [[torch.zeros(1), {"guidance": 2.5, "pooled_output": 1}],
                [torch.ones(1), {"guidance": 2.5}]]
    negative = [[torch.zeros(1), {"guidance": 3.5}], [torch.ones(1), {}]]
    shared = guidance_nodes.with_distilled_guidance_of(positive, negative)
    assert [entry[1]["guidance"] for entry in shared] == [2.5, 2.5]
    assert negative[0][1]["guidance"] == 3.5 and "guidance" not in negative[1][1]  # not mutated
    mixed = [[torch.zeros(1), {"guidance": 2.5}], [torch.zeros(1), {"guidance": 4.0}]]
    assert guidance_nodes.with_distilled_guidance_of(mixed, negative) is negative
    assert guidance_nodes.with_distilled_guidance_of([[torch.zeros(1), {}]], negative) is negative
