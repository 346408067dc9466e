"""Normalized text/image guidance as a GUIDER for the core SamplerCustomAdvanced, and an
all-in-one sampler node built on the same guider (docs/ARCHITECTURE.md, Normalized guidance;
the math is kernels/guidance.py).

All branches of a step run in ONE batched model call (`calc_cond_batch` with the conds
[positive, negative, negative]); `transformer_options["multiref_branches"]` tells the pack's
patches which chunk is the full, image-only and uncond branch (docs/CONTRACTS.md), so the adapter
and MSA patches put the image condition on the full and image-only rows only.
"""
import logging
import math

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..kernels import guidance
from ..families.runs import run_hooks
from ..families.unet import BRANCHES_KEY

log = logging.getLogger("multiref")

THREE_BRANCH = "three-branch"
TWO_BRANCH = "two-branch"
MODES = (THREE_BRANCH, TWO_BRANCH)
# Roles of the guider's cond list, by index (see docs/CONTRACTS.md).
THREE_BRANCHES = ("full", "image", "uncond")
TWO_BRANCHES = ("full", "uncond")
FULL_ONLY = ("full",)


class MultiRefGuider(comfy.samplers.CFGGuider):
    """u / i / f guidance with the min-norm rescale; the two-branch form when the image scale is
    0 (at that step or for the whole run) or in two-branch mode. Only predict_noise and sample
    are overridden, with the host's signatures passed through, so every ComfyUI version that
    has CFGGuider runs it."""

    def __init__(self, model_patcher, text_scale, image_scale, image_scale_ramp, normalize, mode,
                 ramp_over="steps", skip_first_step=False, cfg_end_percent=1.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("text_scale", text_scale), ("image_scale", image_scale),
                            ("image_scale_ramp", image_scale_ramp)):
            if not math.isfinite(value):  # the editor's limits do not stop a NaN in an API prompt
                raise ValueError(f"{name}: {value} is not a number; give a finite scale")
        if ramp_over not in guidance.RAMPS:
            raise ValueError(f"image_scale_ramp_over must be one of {guidance.RAMPS}, got "
                             f"{ramp_over!r}")
        if not 0.0 <= cfg_end_percent <= 1.0:
            raise ValueError(f"cfg_end_percent must be between 0 and 1, got {cfg_end_percent}")
        self.ramp_over = ramp_over
        self.skip_first_step = skip_first_step
        self.cfg_end_percent = cfg_end_percent
        super().__init__(model_patcher)
        self.set_cfg(text_scale)
        self.image_scale = image_scale
        self.image_scale_ramp = image_scale_ramp
        self.normalize = normalize
        self.mode = mode
        self.schedule = None
        self.warned_no_image = False

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        # The image scale ramps over this sampling's schedule; the host hands the schedule in here.
        self.schedule = sigmas
        self.warned_no_image = False
        # A run of this guider is a run of the patches' per-run state; hosts with lifecycle
        # callbacks call the hooks themselves (and give none here).
        hooks = run_hooks(self.model_options)
        hooks.begin()
        try:
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            hooks.end()

    def image_scale_now(self, sigma):
        if self.mode == TWO_BRANCH:
            return 0.0
        if self.ramp_over == "timestep":
            sampling = self.model_patcher.get_model_object("model_sampling")
            progress = guidance.timestep_progress(float(sampling.timestep(torch.tensor(sigma))))
        elif self.schedule is None:
            progress = 0.0
        else:
            progress = guidance.sampling_progress(sigma, self.schedule)
        return guidance.image_scale_at(progress, self.image_scale, self.image_scale_ramp)

    def guided_at(self, sigma):
        """False where only the full branch runs: the first step with skip_first_step (SynCD's
        Flux sampling starts true CFG at the second step), and past cfg_end_percent."""
        if self.skip_first_step and self.schedule is not None and sigma >= float(self.schedule[0]):
            return False
        if self.cfg_end_percent < 1.0:
            sampling = self.model_patcher.get_model_object("model_sampling")
            return sigma >= float(sampling.percent_to_sigma(self.cfg_end_percent))
        return True

    def set_conds(self, positive, negative):
        super().set_conds(positive, with_distilled_guidance_of(positive, negative))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.reshape(-1)[0])
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        if not self.guided_at(sigma):
            return self.run_branches(x, timestep, model_options, [positive], FULL_ONLY)[0]
        image_scale = self.image_scale_now(sigma)
        if image_scale == 0.0:
            full, uncond = self.run_branches(x, timestep, model_options, [positive, negative],
                                             TWO_BRANCHES)
            return guidance.two_branch_guidance(uncond, full, self.cfg, self.normalize)
        full, image, uncond = self.run_branches(x, timestep, model_options,
                                                [positive, negative, negative], THREE_BRANCHES)
        combine = guidance.normalized_guidance if self.normalize else guidance.plain_three_branch_guidance
        guided = combine(uncond, image, full, self.cfg, image_scale)
        # A row whose image-only prediction equals uncond has no image condition at this step
        # (no adapter/MSA on the model, or one limited to a sigma range). Eq. 4 would then
        # cancel the text guidance too (d_img = 0 makes m = 0); text-only CFG is what is meant.
        no_image = guidance.lacks_image_condition(uncond, image)
        if bool(no_image.any()):
            self.warn_no_image(sigma)
            text_only = guidance.two_branch_guidance(uncond, full, self.cfg, self.normalize)
            guided = torch.where(no_image, text_only, guided)
        return guided

    def run_branches(self, x, timestep, model_options, conds, branches):
        options = dict(model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        options["transformer_options"][BRANCHES_KEY] = branches
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)

    def warn_no_image(self, sigma):
        if not self.warned_no_image:
            self.warned_no_image = True
            log.warning("MultiRef guidance: the image-only branch equals the uncond branch at "
                        "sigma %.4g: the model carries no image condition there (apply a MultiRef "
                        "adapter or MSA first); text-only CFG is used where that happens", sigma)


DISTILLED_GUIDANCE_KEY = "guidance"  # the conditioning value FluxGuidance sets


def with_distilled_guidance_of(positive, negative):
    """The negative conditioning carrying the positive's distilled guidance value (Flux-dev's
    `guidance` embedding), so all branches are true CFG on top of the same distilled guidance,
    as SynCD samples Flux. A positive without one value for all its entries leaves the negative
    as it is (the model's default applies to both; a model without the embedding ignores it)."""
    values = {entry[1].get(DISTILLED_GUIDANCE_KEY) for entry in positive}
    if len(values) != 1 or None in values:
        return negative
    value = values.pop()
    return [[entry[0], dict(entry[1], **{DISTILLED_GUIDANCE_KEY: value})] for entry in negative]


def _guidance_inputs():
    return {
        "text_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1,
                       "round": 0.01, "tooltip":
                       "s_T: strength of the prompt (text) guidance. In two-branch mode it is the "
                       "ordinary CFG scale."}),
        "image_scale": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                        "round": 0.01, "tooltip":
                        "s_I0: strength of the image (reference) guidance at the first step. 0 "
                        "with ramp 0 runs plain two-branch CFG (no image-only branch)."}),
        "image_scale_ramp": ("FLOAT", {"default": 5.0, "min": -100.0, "max": 100.0, "step": 0.1,
                             "round": 0.01, "tooltip":
                             "a: the image scale grows linearly from image_scale at the first "
                             "step to image_scale + ramp at the last one (never below 0)."}),
        "normalize": ("BOOLEAN", {"default": True, "tooltip":
                      "On: the image and text guidance vectors are shrunk to the smaller one's "
                      "norm per sample (SynCD eq. 4), which keeps high scales from burning "
                      "colors; two-branch: the guided prediction's norm is capped at the "
                      "prompt prediction's. Off: plain (unnormalized) guidance."}),
        "mode": (list(MODES), {"default": THREE_BRANCH, "tooltip":
                 "three-branch: uncond / image-only / full predictions, for a model patched with "
                 "a MultiRef adapter or MSA. two-branch: uncond / full (ordinary CFG), for any "
                 "model."}),
    }


_OPTIONAL_INPUTS = {
    "image_scale_ramp_over": (list(guidance.RAMPS), {"default": "steps", "tooltip":
                              "steps: the ramp grows linearly over this run's steps. timestep: as "
                              "SynCD, image_scale + ramp x (1000 - t) / 1000 of the model's "
                              "timestep t, whatever the step count."}),
    "skip_first_step": ("BOOLEAN", {"default": False, "tooltip":
                        "On: the first step runs the full branch alone, unguided (SynCD on Flux "
                        "starts true CFG at the second step; recommended on guidance-distilled "
                        "models such as Flux-dev)."}),
    "cfg_end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                        "tooltip": "Guidance runs until this part of the sampling (as the core "
                        "start/end percents); after it only the full branch runs, one row per "
                        "image (faster; on a guidance-distilled model its own guidance embedding "
                        "still applies)."}),
}


_CONDITIONING_TOOLTIPS = {
    "positive": "The prompt (full branch: prompt + image condition).",
    "negative": "The negative prompt (used by the image-only and uncond branches).",
}


class MultiRefNormalizedCFGGuider:
    DESCRIPTION = ("Normalized text/image guidance (SynCD eq. 4) as a GUIDER for the core "
                   "SamplerCustomAdvanced. Each step predicts uncond (negative text, no image), "
                   "image-only (negative text + references) and full (prompt + references) in one "
                   "batched model call and combines them with the image and text guidance "
                   "rescaled to the same norm. It replaces CFG, so model-level CFG hooks "
                   "(pre/post-CFG functions) are not run.")
    CATEGORY = "MultiRef"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("Guider for SamplerCustomAdvanced.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model, usually after a MultiRef adapter and/or MSA "
                                "node (they tell the branches apart)."}),
            "positive": ("CONDITIONING", {"tooltip": _CONDITIONING_TOOLTIPS["positive"]}),
            "negative": ("CONDITIONING", {"tooltip": _CONDITIONING_TOOLTIPS["negative"]}),
            **_guidance_inputs(),
        }, "optional": dict(_OPTIONAL_INPUTS)}

    def get_guider(self, model, positive, negative, text_scale, image_scale, image_scale_ramp,
                   normalize, mode, image_scale_ramp_over="steps", skip_first_step=False,
                   cfg_end_percent=1.0):
        guider = MultiRefGuider(model, text_scale, image_scale, image_scale_ramp, normalize, mode,
                                image_scale_ramp_over, skip_first_step, cfg_end_percent)
        guider.set_conds(positive, negative)
        return (guider,)


class MultiRefSampler:
    DESCRIPTION = ("All-in-one sampler with MultiRef's normalized text/image guidance, for simple "
                   "graphs (the same guidance as MultiRefNormalizedCFGGuider + "
                   "SamplerCustomAdvanced).")
    CATEGORY = "MultiRef"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model, usually after a MultiRef adapter and/or MSA "
                                "node."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip":
                     "Seed of the initial noise."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip":
                      "Number of sampling steps."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "positive": ("CONDITIONING", {"tooltip": _CONDITIONING_TOOLTIPS["positive"]}),
            "negative": ("CONDITIONING", {"tooltip": _CONDITIONING_TOOLTIPS["negative"]}),
            "latent_image": ("LATENT", {"tooltip": "Empty latent (text-to-image) or an encoded "
                                        "image to denoise partially."}),
            **_guidance_inputs(),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "How much of the schedule to run: 1 from pure noise, less keeps more of "
                        "the input latent."}),
        }, "optional": dict(_OPTIONAL_INPUTS)}

    def sample(self, model, seed, steps, sampler_name, scheduler, positive, negative,
               latent_image, text_scale, image_scale, image_scale_ramp, normalize,
               mode, denoise, image_scale_ramp_over="steps", skip_first_step=False,
               cfg_end_percent=1.0):
        guider = MultiRefGuider(model, text_scale, image_scale, image_scale_ramp, normalize, mode,
                                image_scale_ramp_over, skip_first_step, cfg_end_percent)
        guider.set_conds(positive, negative)
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device,
                                         sampler=sampler_name, scheduler=scheduler,
                                         denoise=denoise, model_options=model.model_options).sigmas
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        progress = comfy.utils.ProgressBar(max(len(sigmas) - 1, 1))
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"),
                                callback=lambda step, x0, x, total: progress.update_absolute(step + 1, total),
                                disable_pbar=True, seed=seed)
        out = dict(latent_image)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return (out,)


NODE_CLASS_MAPPINGS = {
    "MultiRefNormalizedCFGGuider": MultiRefNormalizedCFGGuider,
    "MultiRefSampler": MultiRefSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MultiRefNormalizedCFGGuider": "MultiRef Normalized CFG Guider",
    "MultiRefSampler": "MultiRef Sampler (normalized guidance)",
}
