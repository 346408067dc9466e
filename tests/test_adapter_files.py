"""More published adapter files: full-face and Plus-face load and encode; Kolors and FaceID files
are recognised by their keys and refused, naming what the pack lacks for them."""
import os

import pytest
import torch

import tiny_checkpoints as tc
from multiref.kernels import checkpoints
from multiref.families import tiny_models
from test_adapters import adapter_folder, gelu, layer_norm, load_through_node  # noqa: F401


@pytest.fixture(scope="module")
def parts():
    return {"sd15": tiny_models.tiny_unet("sd15"), "clip_vision": tiny_models.tiny_clip_vision()}


def slow_full_face(written, hidden):
    """h94's MLPProjModel written out in float64: Linear, GELU (erf), Linear, LayerNorm, on
    every CLIP hidden state separately."""
    w = {k[len("image_proj."):]: v.double() for k, v in written.items() if k.startswith("image_proj.")}
    x = hidden.double() @ w["proj.0.weight"].T + w["proj.0.bias"]
    x = gelu(x) @ w["proj.2.weight"].T + w["proj.2.bias"]
    return layer_norm(x, w["proj.3.weight"], w["proj.3.bias"])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_full_face_loads_encodes_and_converts(host, parts, adapter_folder, fmt):
    path, written = tc.write_checkpoint(str(adapter_folder), "ip_adapter_full_face", "sd15", fmt)
    adapter = load_through_node(host, os.path.basename(path))
    assert (adapter.kind, adapter.family, adapter.tokens) == ("ip_adapter_full_face", "sd15", None)
    assert "one token per CLIP token" in adapter.describe()
    assert adapter.uncond_convention == "zero-normalized-pixels"  # h94 IPAdapterFull = Plus's
    views = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    refs = host.nodes["MultiRefReference"]().make(views, "face", 1.0, 0.0, 1.0)[0]
    (enc,) = host.nodes["MultiRefEncodeReferences"]().encode(
        refs, adapter, parts["clip_vision"], parts["sd15"], 0)[0]
    hidden = parts["clip_vision"].encode_image(views)["penultimate_hidden_states"]
    clip_tokens = hidden.shape[1]  # the class token and every patch
    assert enc.image_tokens.shape == (1, 2 * clip_tokens, tc.CONTEXT["sd15"])
    expected = slow_full_face(written, hidden).reshape(1, -1, tc.CONTEXT["sd15"])
    # fp16 file weights computed in float32 vs float64: 1e-4 on O(1) outputs.
    assert (enc.image_tokens.double() - expected).abs().max() < 1e-4
    zero = parts["clip_vision"].model(pixel_values=torch.zeros(1, 3, 224, 224),
                                      intermediate_output=-2)[1]
    assert (enc.uncond_tokens[0, :clip_tokens].double() - slow_full_face(written, zero)[0]).abs().max() < 1e-4

    own = str(adapter_folder / f"converted_full_face_{fmt}.safetensors")
    checkpoints.save_adapter(adapter, own)
    again = load_through_node(host, os.path.basename(own))
    assert (again.kind, again.fingerprint) == (adapter.kind, adapter.fingerprint)
    assert all(torch.equal(v, written[k]) for k, v in again.state_dict().items())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plus_face_is_a_plus_layout_labelled_by_its_name(host, adapter_folder, family):
    """Plus-face files have the Plus keys and shapes (only their training differs): they load
    as Plus, and the file name tells them apart in every message."""
    path, written = tc.write_checkpoint(str(adapter_folder), "ip_adapter_plus_face", family,
                                        "safetensors")
    adapter = load_through_node(host, os.path.basename(path))
    assert adapter.kind == "ip_adapter_plus" and adapter.family == family
    assert adapter.describe().startswith(os.path.basename(path))
    assert all(torch.equal(v, written[k]) for k, v in adapter.state_dict().items())


def test_kolors_plus_is_refused_naming_why(adapter_folder):
    path, _ = tc.write_checkpoint(str(adapter_folder), "kolors_ip_adapter_plus", "sdxl")
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_adapter(path)
    message = str(err.value)
    assert message.startswith("ip_adapter_plus_general.bin: a Kolors IP-Adapter Plus file")
    for part in ("ChatGLM", "SD1.5 and SDXL base models only", "ComfyUI_IPAdapter_plus",
                 "ip-adapter-plus_sdxl_vit-h"):
        assert part in message
    # The SDXL Plus layout (a Resampler narrower than its output) still loads.
    plus, _ = tc.write_checkpoint(str(adapter_folder), "ip_adapter_plus", "sdxl")
    assert checkpoints.load_adapter(plus).kind == "ip_adapter_plus"


@pytest.mark.parametrize("layout,family,lora", [("faceid", "sd15", True),
                                                ("faceid_plusv2", "sdxl", True),
                                                ("faceid_portrait", "sd15", False)])
def test_faceid_files_are_refused_naming_what_is_missing(host, adapter_folder, layout, family,
                                                         lora):
    path, _ = tc.write_checkpoint(str(adapter_folder), layout, family)
    with pytest.raises(checkpoints.CheckpointError) as err:
        host.nodes["MultiRefAdapterLoader"]().load(os.path.basename(path))
    message = str(err.value)
    assert message.startswith(f"{os.path.basename(path)}: an IP-Adapter FaceID file")
    assert "InsightFace" in message and "512-value" in message
    assert ("to_q_lora" in message) == lora
    assert "ip-adapter-plus-face_sd15" in message  # what to use instead
