"""Adapter checkpoints: every supported layout loads through the node with the right kind, family
and layer count; conversion to the pack's format is lossless; the Resampler matches a slow
per-head implementation; the published layer numbering maps to the right ComfyUI blocks for the
real SD1.5 and SDXL UNets; every mismatch is caught with a message naming both sides."""
import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import tiny_checkpoints as tc
from headless.host import HostError
from multiref.kernels import adapter as adapter_mod
from multiref.kernels import checkpoints
from multiref.families import tiny_models

LAYOUT_FILES = [  # (layout, family, file format) as published
    ("ip_adapter", "sd15", "bin"), ("ip_adapter_plus", "sd15", "bin"),
    ("ip_adapter", "sdxl", "safetensors"), ("ip_adapter_plus", "sdxl", "bin"),
    ("ip_adapter_plus", "sdxl", "safetensors"),
    ("mip_adapter", "sdxl", "bin"), ("mip_adapter_plus", "sdxl", "bin"),
    ("syncd", "sdxl", "ckpt"),
]


@pytest.fixture()
def adapter_folder(host, tmp_path):
    """A fresh folder registered as models/multiref (as extra_model_paths.yaml would add one)."""
    folder = tmp_path / "multiref"
    folder.mkdir()
    host.folder_paths.add_model_folder_path("multiref", str(folder))
    return folder


def load_through_node(host, name):
    loader = host.nodes["MultiRefAdapterLoader"]
    assert name in loader.INPUT_TYPES()["required"]["adapter_name"][0]
    return loader().load(name)[0]


# ---------------------------------------------------------------------------------------------
# Every layout

@pytest.mark.parametrize("layout,family,fmt", LAYOUT_FILES)
def test_layout_loads_and_converts_losslessly(host, adapter_folder, layout, family, fmt):
    path, written = tc.write_checkpoint(str(adapter_folder), layout, family, fmt)
    adapter = load_through_node(host, os.path.basename(path))
    assert adapter.kind == layout
    assert adapter.family == family
    assert len(adapter.layers) == len(tc.TINY_BLOCKS)
    assert adapter.tokens == (16 if "plus" in layout or layout == "syncd" else 4)
    assert adapter.has_text_to_weight == layout.startswith("mip")
    assert adapter.has_self_attn_lora == (layout == "syncd")
    loaded = adapter.state_dict()
    assert sorted(loaded) == sorted(written)
    for key, value in written.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key

    own = str(adapter_folder / f"converted_{layout}_{family}.safetensors")
    checkpoints.save_adapter(adapter, own)
    again = load_through_node(host, os.path.basename(own))
    assert (again.kind, again.family, again.fingerprint) == (adapter.kind, adapter.family,
                                                             adapter.fingerprint)
    for key, value in again.state_dict().items():
        assert torch.equal(value, written[key]), key
    if layout == "syncd":
        assert again.layers[0].self_attn_lora["to_q"].scale == 1.0  # alpha = rank, as published


def test_pack_format_metadata(tmp_path):
    path, _ = tc.write_checkpoint(str(tmp_path), "mip_adapter_plus", "sdxl")
    adapter = checkpoints.load_adapter(path)
    own = checkpoints.save_adapter(adapter, str(tmp_path / "own.safetensors"))
    _, metadata = checkpoints.read_checkpoint(own)
    assert metadata == {"format": "multiref-adapter", "format_version": "1", "family": "sdxl",
                        "kind": "mip_adapter_plus", "contents": "image_proj,ip_adapter,text_to_weight",
                        "layers": "7", "uncond": "zero-normalized-pixels"}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_fingerprint_changes_with_weights(tmp_path):
    a, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15", name="a.bin", seed=0)
    b, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15", name="b.bin", seed=1)
    c, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15", name="c.bin", seed=0)
    fa, fb, fc = (checkpoints.load_adapter(p).fingerprint for p in (a, b, c))
    assert fa == fc and fa != fb


# ---------------------------------------------------------------------------------------------
# The math of the image projections, against slow independent code

def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def slow_resampler(sd, features, dim_head=64):
    """IP-Adapter Plus in float64, one head and one query at a time."""
    sd = {k: v.double() for k, v in sd.items()}
    x = features.double() @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    latents = sd["latents"].expand(x.shape[0], -1, -1).clone()
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}."
        xn = layer_norm(x, sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"])
        ln = layer_norm(latents, sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"])
        q = ln @ sd[p + "0.to_q.weight"].T
        kv_in = torch.cat([xn, ln], dim=1)
        inner = q.shape[-1]
        k = kv_in @ sd[p + "0.to_kv.weight"][:inner].T
        v = kv_in @ sd[p + "0.to_kv.weight"][inner:].T
        out = torch.zeros_like(q)
        for b in range(q.shape[0]):
            for h in range(inner // dim_head):
                cols = slice(h * dim_head, (h + 1) * dim_head)
                for n in range(q.shape[1]):
                    scores = (k[b, :, cols] * q[b, n, cols]).sum(-1) / math.sqrt(dim_head)
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    out[b, n, cols] = (weights[:, None] * v[b, :, cols]).sum(0)
        latents = out @ sd[p + "0.to_out.weight"].T + latents
        ff = layer_norm(latents, sd[p + "1.0.weight"], sd[p + "1.0.bias"])
        ff = gelu(ff @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
        latents = ff + latents
    out = latents @ sd["proj_out.weight"].T + sd["proj_out.bias"]
    return layer_norm(out, sd["norm_out.weight"], sd["norm_out.bias"])


def test_resampler_matches_per_head_loops():
    gen = torch.Generator().manual_seed(0)
    sd = tc.resampler_weights(gen, context=48, dtype=torch.float32)
    module = adapter_mod.Resampler.from_state_dict(sd)
    assert (module.tokens, module.output_dim, module.input_width) == (16, 48, 32)
    assert module.layers[0][0].heads == 2
    features = torch.randn(2, 50, 32, generator=gen)
    got = module(features)
    expected = slow_resampler(sd, features)
    assert got.shape == (2, 16, 48)
    # float32 module vs float64 loops over 4 residual layers: 1e-4 absolute on O(1) outputs.
    assert (got.double() - expected).abs().max() < 1e-4
    # Each batch row is projected on its own (no leakage across images).
    assert torch.allclose(module(features[1:]), got[1:], atol=1e-5)


def test_linear_projection_matches_reference():
    gen = torch.Generator().manual_seed(1)
    sd = tc.linear_projection_weights(gen, context=16, dtype=torch.float32)
    module = adapter_mod.LinearProjection.from_state_dict(sd)
    embeds = torch.randn(3, 24, generator=gen)
    got = module(embeds)
    flat = embeds.double() @ sd["proj.weight"].double().T + sd["proj.bias"].double()
    expected = torch.stack([layer_norm(flat[:, t * 16:(t + 1) * 16], sd["norm.weight"].double(),
                                       sd["norm.bias"].double()) for t in range(4)], dim=1)
    assert got.shape == (3, 4, 16)
    assert (got.double() - expected).abs().max() < 1e-5


def test_syncd_resampler_conversion_is_exact(tmp_path):
    """SynCD stores the Resampler in diffusers names (separate to_k / to_v): converted back it
    gives the published tensors and the same outputs."""
    path, written = tc.write_checkpoint(str(tmp_path), "syncd", "sdxl")
    adapter = checkpoints.load_adapter(path)
    proj = {k[len("image_proj."):]: v.float() for k, v in written.items() if k.startswith("image_proj.")}
    features = torch.randn(1, 50, 32)
    reference = adapter_mod.Resampler.from_state_dict(proj)(features)
    got = adapter.project({"penultimate_hidden_states": features})
    assert got.dtype == torch.float32  # fp16 file weights are computed in float32 on the CPU
    assert (got - reference).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Layer numbering <-> ComfyUI blocks, on the real UNet configurations

def meta_unet(family):
    """The host's real UNetModel with the published SD1.5 / SDXL configuration (as the host's
    model detection reads it from the real checkpoints: transformer_depth_output runs from the
    last output block to the first), on the meta device (structure only, no memory)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    common = dict(in_channels=4, out_channels=4, num_res_blocks=2, dropout=0, image_size=32,
                  use_spatial_transformer=True, use_temporal_attention=False,
                  use_temporal_resblock=False, model_channels=320)
    config = {
        "sdxl": dict(common, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                     transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                     transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                     adm_in_channels=2816, num_classes="sequential", num_head_channels=64,
                     num_heads=-1),
        "sd15": dict(common, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                     transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False,
                     adm_in_channels=None, num_heads=8, num_head_channels=-1),
    }[family]
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


def published_locations(family):
    unet = meta_unet(family)
    return adapter_mod.published_order(loc for loc, _ in checkpoints.unet_transformer_blocks(unet))


def test_real_sdxl_layer_map():
    order = published_locations("sdxl")
    assert len(order) == 70
    by_number = {2 * i + 1: loc for i, loc in enumerate(order)}
    assert by_number[1] == ("input", 4, 0)
    assert by_number[3] == ("input", 4, 1)
    assert by_number[5] == ("input", 5, 0)
    assert by_number[9] == ("input", 7, 0)
    assert by_number[47] == ("input", 8, 9)
    assert by_number[49] == ("output", 0, 0)
    assert by_number[109] == ("output", 3, 0)
    assert by_number[119] == ("output", 5, 1)
    assert by_number[121] == ("middle", 0, 0)
    assert by_number[139] == ("middle", 0, 9)


def test_real_sd15_layer_map():
    order = published_locations("sd15")
    assert len(order) == 16
    by_number = {2 * i + 1: loc for i, loc in enumerate(order)}
    assert [by_number[n] for n in (1, 3, 5, 7, 9, 11)] == [
        ("input", b, 0) for b in (1, 2, 4, 5, 7, 8)]
    assert [by_number[n] for n in range(13, 31, 2)] == [("output", b, 0) for b in range(3, 12)]
    assert by_number[31] == ("middle", 0, 0)


def real_sdxl_syncd_blocks(inner=8):
    """The diffusers module paths of SDXL's 70 transformer blocks, in diffusers order, each
    with the ComfyUI location it must land on (written out from the SDXL block layout)."""
    blocks = []
    for level, input_ids, depth in ((1, (4, 5), 2), (2, (7, 8), 10)):
        for a, block_id in enumerate(input_ids):
            for t in range(depth):
                blocks.append((f"down_blocks.{level}.attentions.{a}.transformer_blocks.{t}",
                               ("input", block_id, t), inner))
    for level, output_ids, depth in ((0, (0, 1, 2), 10), (1, (3, 4, 5), 2)):
        for a, block_id in enumerate(output_ids):
            for t in range(depth):
                blocks.append((f"up_blocks.{level}.attentions.{a}.transformer_blocks.{t}",
                               ("output", block_id, t), inner))
    blocks += [(f"mid_block.attentions.0.transformer_blocks.{t}", ("middle", 0, t), inner)
               for t in range(10)]
    return tuple(blocks)


def test_syncd_real_sdxl_names_land_on_their_blocks(tmp_path):
    blocks = real_sdxl_syncd_blocks()
    path, _ = tc.write_checkpoint(str(tmp_path), "syncd", "sdxl", blocks=blocks)
    raw = torch.load(path, weights_only=True)["state_dict"]
    adapter = checkpoints.load_adapter(path).bind(published_locations("sdxl"))
    assert len(adapter.layers) == 70
    for diffusers_path, location, _ in blocks:
        layer = adapter.layer(location)
        prefix = f"unet.{diffusers_path}."
        assert torch.equal(layer.to_k_ip.weight, raw[prefix + "attn2.processor.attn_op.to_k_ip.0.weight"])
        assert torch.equal(layer.to_v_ip.weight, raw[prefix + "attn2.processor.attn_op.to_v_ip.0.weight"])
        assert torch.equal(layer.self_attn_lora["to_out"].up.weight,
                           raw[prefix + "attn1.to_out.0.lora_B.default.weight"])


def test_tiny_unet_binding(tmp_path):
    path, written = tc.write_checkpoint(str(tmp_path), "mip_adapter", "sdxl")
    unet = tiny_models.tiny_unet("sdxl").model.diffusion_model
    bound = checkpoints.bind_to_unet(checkpoints.load_adapter(path), unet)
    assert bound.locations == tuple(loc for _, loc, _ in tc.TINY_BLOCKS)
    for i, (_, location, _) in enumerate(tc.TINY_BLOCKS):
        layer = bound.layer(location)
        assert torch.equal(layer.to_k_ip.weight, written[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(layer.text_to_weight.weight,
                           written[f"ip_adapter.{2 * i + 1}.text_to_weight.weight"])
    with pytest.raises(KeyError, match="no layer at"):
        bound.layer(("input", 2, 0))


# ---------------------------------------------------------------------------------------------
# Errors

def test_unknown_layout_names_closest_and_missing(tmp_path):
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in tc.resampler_weights(
        torch.Generator().manual_seed(0), 48).items()}
    path = str(tmp_path / "half.safetensors")
    save_file(tensors, path)
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_adapter(path)
    message = str(err.value)
    assert "half.safetensors" in message and "unknown key layout" in message
    assert "Closest known layout: ip_adapter_plus" in message
    assert "ip_adapter.{N}.to_k_ip.weight" in message


def test_pickle_needing_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "was_run"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = str(tmp_path / "ip-adapter-plus_sd15.bin")
    torch.save({"image_proj": {"latents": Payload()}, "ip_adapter": {}}, path)
    with pytest.raises(checkpoints.CheckpointError, match="refused to load ip-adapter-plus_sd15.bin"):
        checkpoints.load_adapter(path)
    assert not marker.exists()


def test_missing_file_names_folders_and_downloads(host, adapter_folder):
    from multiref.nodes import loaders
    with pytest.raises(checkpoints.CheckpointError) as err:
        loaders.MultiRefAdapterLoader().load("ip-adapter_sdxl.bin")
    message = str(err.value)
    assert "'ip-adapter_sdxl.bin' not found" in message
    assert str(adapter_folder) in message
    assert "ipadapter" in message  # models/ipadapter is searched too
    for name in ("ip-adapter-plus_sd15.bin", "model_sdxl_plus.bin", "sdxl_finetuned_20k.ckpt"):
        assert name in message


def test_pack_creates_its_model_folder(host):
    assert os.path.isdir(os.path.join(host.folder_paths.models_dir, "multiref"))


def test_adapter_name_tooltip_names_the_folders_and_the_readme_section(host):
    tooltip = host.nodes["MultiRefAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][1]["tooltip"]
    for folder in ("multiref", "ipadapter"):
        for path in host.folder_paths.get_folder_paths(folder):
            assert path in tooltip
    assert "'Model files'" in tooltip


def _shipped_with_adapter(name):
    """The two-subject workflow with its adapter file renamed to `name`; returns (prompt, id)."""
    from headless import shipped
    with open(shipped.api_path("two_subjects_routing")) as f:
        prompt = json.load(f)
    node_id = next(i for i, n in prompt.items() if n["class_type"] == "MultiRefAdapterLoader")
    prompt[node_id]["inputs"]["adapter_name"] = name
    return prompt, node_id


def test_missing_adapter_fails_validation_naming_folders_and_downloads(host):
    """The host's own list check would say only "'name' not in [...]"."""
    prompt, node_id = _shipped_with_adapter("not_installed_adapter.bin")
    with pytest.raises(HostError) as err:
        host.execute(prompt)
    message = str(err.value)
    assert f"node {node_id} (MultiRefAdapterLoader): adapter_name - file " \
           "'not_installed_adapter.bin' not found. Searched: " in message
    for path in host.folder_paths.get_folder_paths("multiref"):
        assert path in message
    assert "hqhQAQ/MIP-Adapter" in message and "h94/IP-Adapter" in message


def test_start_up_note_lists_the_example_workflows_missing_files(host, caplog):
    """Expected: each loader input of the shipped API files whose file is in none of the
    folders of its kind, looked up file by file."""
    from headless import shipped
    from multiref.nodes import loaders
    kinds = {"ckpt_name": ("checkpoints",), "clip_name": ("clip_vision",),
             "adapter_name": ("multiref", "ipadapter"), "fusion_name": ("multiref", "ipadapter")}
    expected, installed = set(), set()
    for path in shipped.api_files():
        with open(path) as f:
            for node in json.load(f).values():
                for name, value in node["inputs"].items():
                    if name in kinds and isinstance(value, str):
                        folders = [d for k in kinds[name] for d in host.folder_paths.get_folder_paths(k)]
                        if any(os.path.isfile(os.path.join(d, value)) for d in folders):
                            installed.add(value)
                        else:
                            expected.add(f"{value} -> {folders[0]}")
    with caplog.at_level(logging.WARNING, logger="multiref"):
        loaders.note_missing_example_files()
    notes = [r.getMessage() for r in caplog.records if "example workflows" in r.getMessage()]
    if not expected:
        assert notes == []
        return
    assert len(notes) == 1 and "'Model files'" in notes[0]
    listed = notes[0].split("not installed: ", 1)[1].split(" (what to download")[0].split("; ")
    assert set(listed) == expected
    assert not any(name in notes[0] for name in installed)


def test_layer_count_mismatch(tmp_path):
    path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sdxl",
                                  blocks=real_sdxl_syncd_blocks())
    unet = tiny_models.tiny_unet("sdxl").model.diffusion_model
    with pytest.raises(adapter_mod.AdapterMismatchError, match="has 70 cross-attention layers but "
                                                               "the model has 7"):
        checkpoints.bind_to_unet(checkpoints.load_adapter(path), unet)


def test_layer_width_mismatch(tmp_path):
    blocks = tuple((p, loc, 16) for p, loc, _ in tc.TINY_BLOCKS)  # 16 instead of 32/64
    path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15", blocks=blocks)
    unet = tiny_models.tiny_unet("sd15").model.diffusion_model
    with pytest.raises(adapter_mod.AdapterMismatchError) as err:
        checkpoints.bind_to_unet(checkpoints.load_adapter(path), unet)
    assert "maps context 16 -> 16" in str(err.value) and "maps 16 -> 32" in str(err.value)


def test_damaged_numbering(tmp_path):
    _, tensors = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15")
    del tensors["ip_adapter.5.to_k_ip.weight"], tensors["ip_adapter.5.to_v_ip.weight"]
    path = str(tmp_path / "gap.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    with pytest.raises(checkpoints.CheckpointError, match="not the published 1, 3, 5"):
        checkpoints.load_adapter(path)


def test_legacy_pickle_format_loads(tmp_path):
    """Files saved by old torch (not zip): read without memory-mapping, still weights-only."""
    _, written = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15")
    path = str(tmp_path / "legacy.bin")
    torch.save(tc.published_nested(written), path, _use_new_zipfile_serialization=False)
    adapter = checkpoints.load_adapter(path)
    assert adapter.kind == "ip_adapter" and adapter.family == "sd15"
    assert all(torch.equal(v, written[k]) for k, v in adapter.state_dict().items())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15", "safetensors" if suffix ==
                                  ".safetensors" else "bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(checkpoints.CheckpointError, match="damaged or incompletely downloaded"):
        checkpoints.load_adapter(path)
