"""The shared patch plumbing on the tiny real UNet through the host's real sampler."""
import pytest
import torch

import comfy.sample
from multiref.families import tiny_models
from multiref.families import unet as unet_family

TINY_LOCATIONS = [("input", 1, 0), ("input", 3, 0), ("middle", 0, 0), ("output", 0, 0),
                  ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)]


def _sample(model, steps=2, cfg=4.0):
    clip = tiny_models.tiny_text_encoder("sd15")
    cond = clip.encode_from_tokens(clip.tokenize("a dog"))
    noise = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", [[cond, {}]],
                               [[torch.zeros_like(cond), {}]], torch.zeros(1, 4, 6, 10), seed=0,
                               disable_pbar=True)


def test_attention_locations_walk_every_transformer_block():
    assert unet_family.attention_locations(tiny_models.tiny_unet("sd15")) == TINY_LOCATIONS
    assert unet_family.attention_locations(tiny_models.tiny_unet("sdxl")) == TINY_LOCATIONS


def test_patch_composes_with_a_replace_another_node_put_there():
    model = tiny_models.tiny_unet("sd15")
    reference = _sample(model)
    seen = []

    def other_node(q, k, v, extra_options):
        seen.append("other")
        return unet_family.host_attention_call(q, k, v, extra_options)

    def ours(location, inner):
        def patch(q, k, v, extra_options):
            seen.append(("ours", location))
            return inner(q, k, v, extra_options)
        return patch

    patched = model.clone()
    patched.set_model_attn2_replace(other_node, "middle", 0)
    unet_family.set_attention_patch(patched, "attn2", ours)
    assert torch.equal(_sample(patched), reference)
    assert "other" in seen  # the earlier replace still runs, inside ours
    assert {s[1] for s in seen if s != "other"} == set(TINY_LOCATIONS)
    assert "patches_replace" not in model.model_options.get("transformer_options", {})


def test_block_groups_select_down_or_up_blocks():
    model = tiny_models.tiny_unet("sd15").clone()
    unet_family.set_attention_patch(model, "attn1", lambda loc, inner: inner, blocks="down")
    keys = set(model.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert keys == {("input", 1, 0), ("input", 3, 0)}


def test_rows_are_tagged_with_their_branch_under_host_cfg():
    model = tiny_models.tiny_unet("sd15").clone()
    seen = []

    def record(location, inner):
        def patch(q, k, v, extra_options):
            seen.append(unet_family.row_roles(extra_options, q.shape[0]))
            return inner(q, k, v, extra_options)
        return patch

    unet_family.set_attention_patch(model, "attn1", record)
    _sample(model)
    assert seen and all(sorted(r) == ["full", "uncond"] for r in seen)


def test_reference_rows_ride_in_the_same_call_and_are_sliced_off():
    model = tiny_models.tiny_unet("sd15")
    reference = _sample(model)
    calls, seen = [], []

    def provider(x, timestep, c, roles):
        calls.append(x.shape[0])
        full = unet_family.rows_with_role(roles, "full")
        return torch.randn(2, *x.shape[1:]), [full[0], full[0]], "refs"

    def record(location, inner):
        def patch(q, k, v, extra_options):
            seen.append((unet_family.row_roles(extra_options, q.shape[0]),
                         extra_options["multiref_rows"]))
            return inner(q, k, v, extra_options)
        return patch

    patched = model.clone()
    unet_family.add_row_provider(patched, provider)
    unet_family.set_attention_patch(patched, "attn1", record)
    out = _sample(patched)
    assert calls == [2, 2]  # one UNet call per step, target rows only seen by the provider
    roles, spans = seen[0]
    assert sorted(roles[:2]) == ["full", "uncond"] and roles[2:] == ("ref", "ref")
    assert spans == {"refs": (2, 4)}
    # Rows never attend to each other here, so the targets are unchanged by the extra rows up to
    # the float reassociation a larger matmul batch brings.
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_sigma_range_bounds_follow_percent():
    model = tiny_models.tiny_unet("sd15")
    high, low = unet_family.sigma_range(model, 0.0, 0.5)
    assert high > low > 0
    assert unet_family.in_sigma_range((high + low) / 2, (high, low))
    assert not unet_family.in_sigma_range(low / 2, (high, low))


def test_extra_rows_get_zero_controlnet_residuals():
    residual = torch.ones(2, 3, 4, 4)
    c = {"c_crossattn": torch.randn(2, 5, 16), "control": {"input": [residual, None], "output": []}}
    out = unet_family._extend_conditioning(c, [0, 0, 1], 2)
    assert torch.equal(out["c_crossattn"][2:], c["c_crossattn"][[0, 0, 1]])
    extended = out["control"]["input"][0]
    assert extended.shape[0] == 5 and torch.equal(extended[:2], residual)
    assert not extended[2:].any() and out["control"]["input"][1] is None


def test_non_unet_models_are_refused_with_a_clear_error():
    class NotUNet:
        pass

    class Wrapper:
        class model:
            diffusion_model = NotUNet()

    with pytest.raises(ValueError, match="work on UNet models"):
        unet_family.attention_locations(Wrapper())


def test_the_unet_family_provides_the_whole_seam():
    """families/base.py lists what a family provides; the UNet family has every name, and the
    techniques reach a model only through families/ (they import no family and no host)."""
    from multiref.families import base
    missing = [name for name in base.SEAM + base.TRAINER_SEAM if not hasattr(unet_family, name)]
    assert missing == []
    assert "all" in unet_family.BLOCK_GROUPS
