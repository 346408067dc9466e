"""Tiny Flux / SD3 models from the host's own classes (families/tiny_dit_models.py): they sample
through the host's real sampler and decode with the 16-channel VAE; Flux with ReferenceLatent
(Kontext-style references) too. On a host without Flux the node refuses with a named error."""
import pytest
import torch

from conftest import HOST
from multiref.families import tiny_dit_models
from multiref.nodes import demo

ON_CHECKOUT = HOST.kind != "installable comfyui"
needs_dit = pytest.mark.skipif(not ON_CHECKOUT, reason="Flux/SD3 need a current ComfyUI "
                               "(run with MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)")


@pytest.mark.skipif(ON_CHECKOUT, reason="the installable host's refusal")
def test_installable_host_refuses_dit_families_by_name():
    for family in tiny_dit_models.FAMILIES:
        with pytest.raises(tiny_dit_models.DitHostError, match=f"family '{family}'.*update ComfyUI"):
            demo.MultiRefTinyDemoModels().build(family, 0)


def _sample(model, clip, positive_text="a photo of a dog", steps=2, cfg=2.0, reference=None):
    import comfy.sample
    import node_helpers
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(positive_text))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if reference is not None:
        positive = node_helpers.conditioning_set_values(positive, {"reference_latents": [reference]},
                                                        append=True)
    shape = (1, 16, 8, 12)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                               torch.zeros(shape), seed=0)


@needs_dit
@pytest.mark.parametrize("family", tiny_dit_models.FAMILIES)
def test_tiny_dit_samples_and_decodes(family, one_thread):
    model, clip, vae, _ = demo.MultiRefTinyDemoModels().build(family, 0)
    diffusion_model = model.model.diffusion_model
    expected = {"flux": "Flux", "flux_schnell": "Flux", "sd3": "OpenAISignatureMMDITWrapper"}
    assert type(diffusion_model).__name__ == expected[family]
    if family.startswith("flux"):
        assert diffusion_model.params.guidance_embed == (family == "flux")
    samples = _sample(model, clip)
    assert samples.shape == (1, 16, 8, 12) and torch.isfinite(samples).all()
    image = vae.decode(samples)
    assert image.shape == (1, 64, 96, 3)
    assert vae.encode(image).shape == (1, 16, 8, 12)
    # The prompt reaches the model: another prompt gives another sample.
    assert not torch.equal(samples, _sample(model, clip, "a red car"))


@needs_dit
def test_tiny_flux_takes_reference_latents(one_thread):
    """ReferenceLatent (Kontext) references lengthen the joint sequence and change the result."""
    model, clip, vae, _ = demo.MultiRefTinyDemoModels().build("flux", 0)
    lengths = []
    model = model.clone()

    def record(args, extra):
        lengths.append(args["img"].shape[1])
        return extra["original_block"](args)
    model.set_model_patch_replace(record, "dit", "double_block", 0)
    reference = vae.encode(torch.rand(1, 48, 64, 3))
    plain = _sample(model, clip, cfg=1.0, steps=1)
    with_reference = _sample(model, clip, cfg=1.0, steps=1, reference=reference)
    assert lengths == [4 * 6, 4 * 6 + 3 * 4]  # target tokens, then target + reference tokens
    assert not torch.equal(plain, with_reference)


@needs_dit
@pytest.mark.parametrize("family", tiny_dit_models.FAMILIES)
def test_the_trainer_refuses_a_diffusion_transformer(family):
    from multiref.training import cli, config
    with pytest.raises(config.TrainConfigError, match="diffusion transformer .*the trainer is "
                                                      "UNet-only \\(SD1.5, SDXL\\)"):
        cli.family_of(tiny_dit_models.tiny_dit(family))
