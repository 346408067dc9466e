"""Feature fusion (kernels/feature_fusion.py): the layer rule, the granularity mapping, an
untrained fusion giving the adapter's own tokens, a trained one giving the formula's tokens
(checked against a float64 Resampler on hidden states taken through the host's own
intermediate_output), the hooks' hidden states, and the file section (save, load, damage)."""
import os
from dataclasses import replace

import comfy.clip_vision
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_checkpoints as tc
import workflow_models
from headless import shipped, workflow_format as fmt
from multiref.families import tiny_models, vision
from multiref.kernels import checkpoints, feature_fusion
from multiref.kernels.references import ReferenceInputError
from test_adapters import slow_resampler

FAMILY = "sd15"


@pytest.fixture(scope="module")
def parts():
    return {FAMILY: tiny_models.tiny_unet(FAMILY), "clip_vision": tiny_models.tiny_clip_vision()}


@pytest.fixture()
def plus(tmp_path):
    path, written = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", FAMILY)
    return checkpoints.load_adapter(path), written


def images(views, seed=0):
    return torch.rand(views, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def encode(host, adapter, parts, views, granularity=-1.0, **options):
    refs = host.nodes["MultiRefReference"]().make(views, "dog", 1.0, 0.0, 1.0)[0]
    return host.nodes["MultiRefEncodeReferences"]().encode(
        refs, adapter, parts["clip_vision"], parts[FAMILY], 0, granularity=granularity, **options)[0][0]


def host_hidden_state(clip_vision, views, number):
    """Hidden state `number` through the host's own paths (no hook): the embeddings after the
    pre-layer norm for 0, else the encoder's intermediate_output of layer number - 1."""
    pixels = comfy.clip_vision.clip_preprocess(views).float()
    model = clip_vision.model
    with torch.no_grad():
        if number == 0:
            return model.vision_model.pre_layrnorm(model.vision_model.embeddings(pixels))
        return model(pixel_values=pixels, intermediate_output=number - 1)[1]


def test_layer_rule():
    assert feature_fusion.fusion_layers(32) == (10, 17, 31)  # DynaIP's layers of ViT-H/14
    assert feature_fusion.fusion_layers(24) == (7, 12, 23)
    assert feature_fusion.fusion_layers(3) == (0, 1, 2)  # the tiny CLIP vision
    for depth in range(3, 65):
        low, mid, high = feature_fusion.fusion_layers(depth)
        assert 0 <= low < mid < high == depth - 1
        assert abs(low / depth - 10 / 32) < 1 / depth and abs(mid / depth - 17 / 32) < 1 / depth
    with pytest.raises(feature_fusion.FusionError, match="at least 3 layers"):
        feature_fusion.fusion_layers(2)


def test_granularity_mapping():
    for g, expected in ((0, (1, 0, 0)), (0.25, (0.5, 0.5, 0)), (0.5, (0, 1, 0)),
                        (0.75, (0, 0.5, 0.5)), (1, (0, 0, 1)), (0.1, (0.8, 0.2, 0))):
        weights = feature_fusion.granularity_weights(g)
        assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    for g in torch.linspace(0, 1, 41).tolist():
        weights = feature_fusion.granularity_weights(g)
        assert abs(float(weights.sum()) - 1) < 1e-6 and bool((weights >= 0).all())
    with pytest.raises(feature_fusion.FusionError, match="granularity"):
        feature_fusion.granularity_weights(1.5)


def test_hooked_hidden_states_are_the_hosts(parts):
    clip = parts["clip_vision"]
    views = images(2, seed=3)
    with vision.captured_hidden_states(clip, (0, 1, 2)) as captured:
        output = clip.encode_image(views)
    # The penultimate one is the very tensor the host returns (same operations, same order).
    assert torch.equal(captured[2].to(output["penultimate_hidden_states"]),
                       output["penultimate_hidden_states"])
    for number in (0, 1, 2):
        assert (captured[number] - host_hidden_state(clip, views, number)).abs().max() < 1e-5
    assert not vision.encoder_layers(clip)[0]._forward_pre_hooks  # the hooks are gone


def test_untrained_fusion_gives_the_adapters_own_tokens(host, parts, plus):
    adapter, _ = plus
    fusion = feature_fusion.FeatureFusion.from_projection(adapter.image_proj, depth=3)
    fused = replace(adapter, fusion=fusion, fingerprint="")
    assert fused.fingerprint != adapter.fingerprint
    views = images(2)
    own = encode(host, adapter, parts, views)
    # Without a fusion the default is the path from before the fusion existed, exactly.
    before = adapter.project(parts["clip_vision"].encode_image(views)).float()
    assert torch.equal(own.image_tokens, before.reshape(1, -1, before.shape[-1]))
    for granularity in (-1.0, 0.0, 0.3, 1.0):
        enc = encode(host, fused, parts, views, granularity)
        assert (enc.image_tokens - own.image_tokens).abs().max() < 1e-6
        assert (enc.uncond_tokens - own.uncond_tokens).abs().max() < 1e-6
    hidden = {k: torch.randn(5, 50, tc.CLIP_HIDDEN) for k in fusion.layers}
    weights = fusion.router_weights(hidden)
    assert torch.allclose(weights, torch.tensor(feature_fusion.INITIAL_WEIGHTS).expand(5, 3))


def fused_adapter_file(folder, written, name="fused.safetensors"):
    """A pack file of a trained fusion, written from the layout (not by save_adapter), around
    the same Plus adapter as `written`."""
    path, tensors = tc.write_fusion_checkpoint(str(folder), FAMILY, name)
    assert all(torch.equal(tensors[k], v) for k, v in written.items())
    return path, tensors


def test_trained_fusion_follows_the_formula(host, parts, plus, tmp_path):
    _, written = plus
    path, tensors = fused_adapter_file(tmp_path, written)
    fused = checkpoints.load_adapter(path)
    assert fused.fusion.layers == (0, 1, 2) and "feature fusion" in fused.describe()
    clip, views = parts["clip_vision"], images(1, seed=5)
    hidden = {k: host_hidden_state(clip, views, k).double() for k in (0, 1, 2)}

    def section(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = slow_resampler(section("image_proj."), hidden[2])
    experts = [slow_resampler(section(f"fusion.experts.{level}."), hidden[k])
               for level, k in zip(feature_fusion.LEVELS, (0, 1, 2))]
    logits = torch.cat([hidden[k][:, 0] for k in (0, 1, 2)], -1) @ \
        tensors["fusion.router.weight"].double().T + tensors["fusion.router.bias"].double()
    router = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    assert abs(float(router.sum()) - 1) < 1e-12 and float(router.min()) > 0.01  # a real mix

    enc = encode(host, fused, parts, views)
    expected = own + sum(router[0, e] * experts[e] for e in range(3))
    assert (enc.image_tokens.double() - expected).abs().max() < 1e-4
    # The user's override: granularity 0.25 = half low, half mid, no high expert.
    enc = encode(host, fused, parts, views, granularity=0.25)
    expected = own + 0.5 * experts[0] + 0.5 * experts[1]
    assert (enc.image_tokens.double() - expected).abs().max() < 1e-4
    coarse = encode(host, fused, parts, views, granularity=1.0)
    assert (coarse.image_tokens.double() - (own + experts[2])).abs().max() < 1e-4
    # Router weights of any images sum to 1.
    with torch.no_grad():
        weights = fused.fusion.float().router_weights(
            {k: torch.randn(4, 50, tc.CLIP_HIDDEN) * 3 for k in (0, 1, 2)})
    assert (weights.sum(-1) - 1).abs().max() < 1e-6


def test_combined_views_and_negative_images_go_through_the_fusion(host, parts, plus, tmp_path):
    _, written = plus
    fused = checkpoints.load_adapter(fused_adapter_file(tmp_path, written)[0])
    views = images(2, seed=8)
    combined = encode(host, fused, parts, views, 0.25, combine_views="average")
    refs = host.nodes["MultiRefReference"]().make(views, "dog", 1.0, 0.0, 1.0,
                                                  negative_image=images(1, seed=9))[0]
    negative = host.nodes["MultiRefEncodeReferences"]().encode(
        refs, fused, parts["clip_vision"], parts[FAMILY], 0, granularity=0.25)[0][0]
    clip = parts["clip_vision"]
    average = {k: host_hidden_state(clip, views, k).mean(0, keepdim=True) for k in (0, 1, 2)}
    weights = feature_fusion.granularity_weights(0.25)
    expected = fused.project({"penultimate_hidden_states": average[2],
                              "multiref_hidden_states": average}, weights)
    assert (combined.image_tokens[0, :16] - expected[0]).abs().max() < 1e-4
    assert torch.equal(combined.image_tokens[0, :16], combined.image_tokens[0, 16:])
    neg = images(1, seed=9)
    expected = fused.project({"penultimate_hidden_states": host_hidden_state(clip, neg, 2),
                              "multiref_hidden_states": {k: host_hidden_state(clip, neg, k)
                                                         for k in (0, 1, 2)}}, weights)
    assert (negative.uncond_tokens[0, :16] - expected[0]).abs().max() < 1e-4


def test_save_and_load_keep_the_fusion(plus, tmp_path):
    adapter, _ = plus
    fusion = feature_fusion.FeatureFusion.from_projection(adapter.image_proj, depth=3)
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = replace(adapter, fusion=fusion, fingerprint="")
    path = checkpoints.save_adapter(fused, str(tmp_path / "saved.safetensors"))
    loaded = checkpoints.load_adapter(path)
    saved, again = fused.state_dict(), loaded.state_dict()
    assert sorted(saved) == sorted(again)
    assert all(torch.equal(saved[k].cpu(), again[k]) for k in saved)
    assert loaded.fingerprint == fused.fingerprint and loaded.fusion.layers == (0, 1, 2)
    _, metadata = checkpoints.read_checkpoint(path)
    assert metadata["contents"].split(",")[-1] == "fusion"


def test_damaged_fusion_sections_are_refused(plus, tmp_path):
    _, written = plus
    path, tensors = fused_adapter_file(tmp_path, written)

    def refused(changed, match):
        save_file({k: v.contiguous() for k, v in changed.items()}, path, metadata={
            "format": checkpoints.PACK_FORMAT, "format_version": checkpoints.PACK_FORMAT_VERSION,
            "family": FAMILY, "kind": "ip_adapter_plus"})
        with pytest.raises(checkpoints.CheckpointError, match=match):
            checkpoints.load_adapter(path)
    refused({k: v for k, v in tensors.items() if k != "fusion.router.bias"}, "incomplete")
    refused({k: v for k, v in tensors.items() if not k.startswith("fusion.experts.mid.")},
            r"experts\.mid")
    refused({**tensors, "fusion.layers": torch.tensor([2, 1, 0])}, "increasing")
    refused({**tensors, "fusion.router.weight": torch.zeros(3, 7)}, "router")
    bad = {k: v for k, v in tensors.items() if not k.startswith("fusion.experts.low.")}
    bad.update({f"fusion.experts.low.{k}": v for k, v in tc.resampler_weights(
        torch.Generator().manual_seed(1), tc.CONTEXT["sdxl"]).items()})
    refused(bad, "does not match")
    base = tc.canonical("ip_adapter", FAMILY)  # a base adapter reads image_embeds: no fusion
    refused({**base, **{k: v for k, v in tensors.items() if k.startswith("fusion.")}},
            "LinearProjection reading image_embeds")


def test_fusion_needs_hidden_states_and_matching_parts(host, parts, tmp_path):
    path, written = tc.write_checkpoint(str(tmp_path), "ip_adapter", FAMILY)
    base = checkpoints.load_adapter(path)
    with pytest.raises(feature_fusion.FusionError, match="image_embeds"):
        feature_fusion.FeatureFusion.from_projection(base.image_proj, depth=3)
    with pytest.raises(ReferenceInputError, match="granularity: 0.5 .*no feature fusion"):
        encode(host, base, parts, images(1), granularity=0.5)
    _, plus_written = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", FAMILY)
    fused = checkpoints.load_adapter(fused_adapter_file(tmp_path, plus_written)[0])
    deep = replace(fused, fusion=replace_layers(fused.fusion, (1, 2, 3)), fingerprint="")
    with pytest.raises(checkpoints.AdapterMismatchError, match="has 3 layers"):
        encode(host, deep, parts, images(1))


def replace_layers(fusion, layers):
    return feature_fusion.FeatureFusion(dict(fusion.experts), layers, fusion.router)


def test_the_fusion_workflow_samples_fine_detail_and_coarse_likeness(host, tmp_path):
    """The shipped workflow on the tiny models, its adapter a fused file in the trainer's layout:
    the two granularities give two different pictures from the same seed."""
    api = fmt.load(shipped.api_path("fusion_granularity"))
    assert sorted(n["inputs"]["granularity"] for n in api.values()
                  if n["class_type"] == "MultiRefEncodeReferences") == [0.0, 1.0]
    prompt = workflow_models.swap_in_tiny_models(api, host, tmp_path)
    outputs = host.execute(prompt)
    folder = host.folder_paths.get_output_directory()
    pictures = {}
    for node_id, ui in outputs.items():
        if prompt[node_id]["class_type"] == "SaveImage":
            (image,) = ui["images"]
            with Image.open(os.path.join(folder, image["subfolder"], image["filename"])) as picture:
                pictures[prompt[node_id]["inputs"]["filename_prefix"]] = np.asarray(picture, dtype=np.int16)
    assert sorted(pictures) == ["multiref_fusion_coarse_likeness", "multiref_fusion_fine_detail"]
    fine, coarse = pictures["multiref_fusion_fine_detail"], pictures["multiref_fusion_coarse_likeness"]
    assert fine.shape == coarse.shape and np.abs(fine - coarse).max() > 0
