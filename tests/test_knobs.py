"""Each knob has one meaning, checked against its formula written out here:

  * a reference's `weight` w multiplies the attention weights of its image tokens, in routing
    after the reference's own softmax (its term T + scale * w W(x) O) and in Masked Shared
    Attention before the softmax its tokens share with the image's own (each token counts w
    times); 0 leaves the reference out;
  * MSA's `strength` s blends plain and shared attention of the reading rows,
    plain + s (shared - plain); 0 reads no reference (no reference rows);
  * MSA's `lora_strength` l multiplies every delta of the adapter's self-attention LoRA; 0 is no
    LoRA, bit for bit.
"""
import json
import math
import os

import pytest
import torch

import tiny_checkpoints
from multiref.families import tiny_models
from multiref.kernels import checkpoints, msa
from multiref.kernels.checkpoints import cross_attention_dims, unet_transformer_blocks
from multiref.nodes.msa import MultiRefApplyMSA
from multiref.techniques import msa as msa_technique
from multiref.techniques import routing as routing_technique
from multiref.techniques.relevance import phrase_keys
from test_msa_node import STEPS, TwoPass, _count_unet_calls, _diff, _encoded, _msa, _sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = 2


def _attention_rows(q, keys, values, key_weights):
    """float64, per row and head: sum_j a_j e^(s_j) v_j / sum_j a_j e^(s_j), s_j = q.k_j / sqrt(d):
    attention whose unnormalized weight of key j is multiplied by a_j."""
    d = q.shape[-1] // HEADS
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r in range(q.shape[0]):
        for h in range(HEADS):
            sl = slice(h * d, (h + 1) * d)
            weights = (q[r, :, sl].double() @ keys[r][:, sl].double().T / math.sqrt(d)).exp()
            weights = weights * key_weights.double()
            out[r, :, sl] = weights @ values[r][:, sl].double() / weights.sum(-1, keepdim=True)
    return out


def test_reference_weight_multiplies_its_attention_weights_in_both_techniques():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 8, generator=g) for _ in range(3))
    ref_k, ref_v = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    fg = torch.rand(2, 12, generator=g) < 0.5
    index = msa.foreground_index(fg)
    weights = torch.tensor([0.5, 2.5])

    # MSA: the foreground tokens of reference r count weights[r] times in the shared softmax.
    bias = msa.reference_bias(weights, 12, index)
    out = msa_technique.read_references(q, k, v, HEADS, ref_k, ref_v, index, bias)
    keys = torch.cat([k, msa.gather_foreground(ref_k, index).expand(2, -1, -1)], 1)
    values = torch.cat([v, msa.gather_foreground(ref_v, index).expand(2, -1, -1)], 1)
    token_weights = torch.cat([torch.ones(12), weights.repeat_interleave(12)[index]])
    torch.testing.assert_close(out.double(), _attention_rows(q, keys, values, token_weights),
                               atol=1e-5, rtol=1e-5)

    # Routing: T + scale * sum_i w_i W_i(x) O_i, O_i reference i's own softmax.
    text = torch.randn(2, 12, 8, generator=g)
    ip_k, ip_v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    embeddings = [torch.randn(2, 8, generator=g), torch.randn(1, 8, generator=g)]
    phrases = phrase_keys(torch.nn.Identity(), embeddings, q.device, q.dtype)
    for mode in ("sum", "weighted"):
        route = lambda w: routing_technique.route(q, text, HEADS, ip_k, ip_v, torch.tensor(w), 0.7,
                                                  mode, phrases=phrases)[0]
        # Where a reference goes (W) does not depend on the weights: each term is linear in w_i.
        torch.testing.assert_close(route([0.5, 2.5]) - text,
                                   0.5 * (route([1.0, 0.0]) - text) + 2.5 * (route([0.0, 1.0]) - text),
                                   atol=1e-5, rtol=1e-5)
    expected = text.double().clone()
    for i, w in enumerate(weights.tolist()):
        expected += 0.7 * w * _attention_rows(q, ip_k[:, i], ip_v[:, i], torch.ones(3))
    out = routing_technique.route(q, text, HEADS, ip_k, ip_v, weights, 0.7, "sum")[0]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def syncd(tmp_path_factory):
    """The tiny SDXL UNet, VAE and text encoder, and SynCD's tiny checkpoint (image layers and a
    self-attention LoRA) with its LoRA bound to the UNet's locations."""
    model = tiny_models.tiny_unet("sdxl")
    path = tiny_checkpoints.write_checkpoint(str(tmp_path_factory.mktemp("syncd")), "syncd", "sdxl")[0]
    adapter = checkpoints.load_adapter(path)
    unet = model.model.diffusion_model
    locations = [loc for loc, _ in unet_transformer_blocks(unet)]
    bound = adapter.bind(locations, cross_attention_dims(unet))
    lora = {loc: bound.layer(loc).self_attn_lora for loc in locations}
    vae = tiny_models.tiny_vae()
    clips = {"sdxl": tiny_models.tiny_text_encoder("sdxl")}
    return model, adapter, lora, _encoded(vae, 2), clips


def test_lora_strength_multiplies_the_lora_deltas(syncd):
    model, adapter, lora, refs, clips = syncd
    sample = lambda m: _sample(m, clips, "sdxl")
    for scale in (0.5, 1.5):
        one_call = sample(_msa(model, refs, adapter=adapter, lora_strength=scale))
        assert _diff(one_call, sample(TwoPass(model, refs, lora, lora_scale=scale).install(model))) < 1e-5
    assert _diff(one_call, sample(_msa(model, refs, adapter=adapter))) > 1e-4
    # 0: the adapter's LoRA is not applied at all, exactly.
    assert torch.equal(sample(_msa(model, refs, adapter=adapter, lora_strength=0.0)),
                       sample(_msa(model, refs)))


def test_strength_blends_the_reading_and_leaves_the_lora_alone(syncd):
    model, adapter, lora, refs, clips = syncd
    sample = lambda m: _sample(m, clips, "sdxl")
    half = sample(_msa(model, refs, adapter=adapter, strength=0.5))
    assert _diff(half, sample(TwoPass(model, refs, lora, strength=0.5).install(model))) < 1e-5
    # 0 reads no reference: no reference rows, and the LoRA alone acts at lora_strength.
    sizes, handle = _count_unet_calls(model)
    try:
        lora_alone = sample(_msa(model, refs, adapter=adapter, strength=0.0, lora_strength=0.5))
    finally:
        handle.remove()
    assert sizes == [2] * STEPS
    two_pass = sample(TwoPass(model, refs, lora, lora_scale=0.5, strength=0.0).install(model))
    assert _diff(lora_alone, two_pass) < 1e-5
    assert _diff(lora_alone, sample(model)) > 1e-4
    # Both knobs at 0 (or strength 0 without a LoRA): the model unpatched, bit for bit.
    plain = sample(model)
    assert torch.equal(sample(_msa(model, refs, adapter=adapter, strength=0.0, lora_strength=0.0)), plain)
    assert torch.equal(sample(_msa(model, refs, strength=0.0)), plain)


def _saved_msa_inputs():
    """The MultiRefApplyMSA widgets of the shipped references workflow as saved before
    lora_strength existed (the input taken out, links left out)."""
    with open(os.path.join(ROOT, "api_workflows", "msa_references_api.json")) as f:
        prompt = json.load(f)
    node = next(n for n in prompt.values() if n["class_type"] == "MultiRefApplyMSA")
    return {name: value for name, value in node["inputs"].items()
            if not isinstance(value, list) and name != "lora_strength"}


def test_an_old_saved_msa_node_still_runs_and_what_it_now_means(syncd):
    """Saved before lora_strength: the host passes no value, the default 1 applies. With
    strength > 0 that is what it gave before (the LoRA fully on); with strength 0 and an adapter
    carrying a LoRA it now gives the LoRA alone where it gave the unpatched model (CHANGELOG);
    strength 0 without such an adapter is still the unpatched model."""
    model, adapter, _, refs, clips = syncd
    saved = _saved_msa_inputs()
    assert "strength" in saved and "reference_conditioning" in saved
    saved["reference_conditioning"] = "target_text"  # the tiny test has no CLIP for syncd
    node = MultiRefApplyMSA()
    sample = lambda m: _sample(m, clips, "sdxl")
    run = lambda **kw: sample(node.apply(model, references=refs, **dict(saved, **kw))[0])
    assert torch.equal(run(strength=0.7, adapter=adapter),
                       sample(_msa(model, refs, adapter=adapter, strength=0.7, lora_strength=1.0,
                                   first_step_unmasked=saved["first_step_unmasked"],
                                   reference_conditioning="target_text")))
    now = run(strength=0.0, adapter=adapter)
    assert torch.equal(now, sample(_msa(model, refs, adapter=adapter, strength=0.0)))
    assert _diff(now, sample(model)) > 1e-4
    assert torch.equal(run(strength=0.0), sample(model))


@pytest.mark.parametrize("value", [-0.5, 2.5, float("nan")])
def test_lora_strength_outside_its_range_is_refused_by_name(syncd, value):
    model, adapter, _, refs, _ = syncd
    with pytest.raises(ValueError, match="lora_strength: .* is outside 0..2"):
        _msa(model, refs, adapter=adapter, lora_strength=value)
