"""Patches reach the model through a clone and leave the original untouched."""
import torch

import comfy.sample
from comfy.ldm.modules.attention import optimized_attention
from multiref.families import tiny_models


def _sample(model, family="sd15"):
    clip = tiny_models.tiny_text_encoder(family)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a dog"), return_pooled=True)
    extra = {"pooled_output": pooled, "width": 64, "height": 48} if family == "sdxl" else {}
    noise = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", [[cond, extra]],
                               [[torch.zeros_like(cond), dict(extra)]],
                               torch.zeros(1, 4, 6, 8), seed=0, disable_pbar=True)


calls = []


def _noop_attention(q, k, v, extra_options):
    """What the unpatched block computes: the host's own attention on the same q, k, v."""
    calls.append((extra_options["block"], extra_options["transformer_index"]))
    return optimized_attention(q, k, v, extra_options["n_heads"])


def test_noop_attention_replace_on_a_clone_is_bit_identical():
    model = tiny_models.tiny_unet("sd15")
    reference = _sample(model)
    patched = model.clone()
    blocks = (("input", 1), ("input", 3), ("middle", 0), ("output", 0), ("output", 1),
              ("output", 2), ("output", 3))  # every transformer of the tiny UNet
    for block, index in blocks:
        patched.set_model_attn1_replace(_noop_attention, block, index)
        patched.set_model_attn2_replace(_noop_attention, block, index)
    calls.clear()
    out = _sample(patched)
    assert {c[0] for c in calls} == set(blocks), f"the replace did not reach every block: {calls}"
    assert torch.equal(out, reference)
    # The original carries no patch and still reproduces its output exactly.
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    calls.clear()
    assert torch.equal(_sample(model), reference)
    assert not calls


def test_identity_patch_is_bit_identical():
    """A patch that returns its input unchanged gives bit-identical latents."""
    model = tiny_models.tiny_unet("sdxl")
    reference = _sample(model, "sdxl")
    seen = []

    def identity(h, hsp, transformer_options):
        seen.append(h.shape)
        return h, hsp

    patched = model.clone()
    patched.set_model_output_block_patch(identity)
    out = _sample(patched, "sdxl")
    assert seen
    assert torch.equal(out, reference)
    assert torch.equal(_sample(model, "sdxl"), reference)
