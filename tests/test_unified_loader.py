"""MultiRef Unified Loader: for each preset and base family it finds the published adapter file
and its CLIP vision model by name, and a missing file is named with its folder and download."""
import os

import pytest
import torch
from safetensors.torch import save_file

import tiny_checkpoints as tc
from multiref.kernels import checkpoints
from multiref.families import tiny_models
from multiref.nodes import unified_loader

# Written from the h94 / MIP-Adapter / SynCD download pages: preset -> {family: (file, CLIP)}.
EXPECTED = {
    ("base", "sd15"): ("ip-adapter_sd15", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("base", "sdxl"): ("ip-adapter_sdxl_vit-h", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("base ViT-bigG", "sdxl"): ("ip-adapter_sdxl", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"),
    ("Plus", "sd15"): ("ip-adapter-plus_sd15", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("Plus", "sdxl"): ("ip-adapter-plus_sdxl_vit-h", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("Plus face", "sd15"): ("ip-adapter-plus-face_sd15", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("Plus face", "sdxl"): ("ip-adapter-plus-face_sdxl_vit-h", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("full face", "sd15"): ("ip-adapter-full-face_sd15", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("MIP-Adapter Plus", "sdxl"): ("model_sdxl_plus", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("MIP-Adapter", "sdxl"): ("model_sdxl", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"),
    ("SynCD", "sdxl"): ("sdxl_finetuned_20k", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
}
LAYOUT = {"base": "ip_adapter", "Plus": "ip_adapter_plus", "Plus face": "ip_adapter_plus_face",
          "full face": "ip_adapter_full_face", "MIP-Adapter Plus": "mip_adapter_plus",
          "MIP-Adapter": "mip_adapter", "SynCD": "syncd"}


@pytest.fixture(scope="module")
def models():
    return {"sd15": tiny_models.tiny_unet("sd15"), "sdxl": tiny_models.tiny_unet("sdxl")}


@pytest.fixture()
def folders(host, tmp_path):
    """Empty adapter and CLIP vision folders of this test, searched first."""
    found = {}
    for kind in ("multiref", "clip_vision"):
        folder = tmp_path / kind
        folder.mkdir()
        paths = host.folder_paths.folder_names_and_paths[kind][0]
        saved = list(paths)
        paths[:] = [str(folder)]
        found[kind] = (folder, paths, saved)
    for name in ("ipadapter",):
        paths = host.folder_paths.folder_names_and_paths[name][0]
        found[name] = (None, paths, list(paths))
        paths[:] = []
    if hasattr(host.folder_paths, "invalidate_cache"):
        for kind in found:
            host.folder_paths.invalidate_cache(kind)
    yield {k: v[0] for k, v in found.items()}
    for _, paths, saved in found.values():
        paths[:] = saved
    if hasattr(host.folder_paths, "invalidate_cache"):
        for kind in found:
            host.folder_paths.invalidate_cache(kind)


def test_presets_cover_the_published_files():
    got = {(preset, family): (os.path.splitext(entry[0])[0],
                              unified_loader.CLIP_VISION[entry[2]][0])
           for preset, by_family in unified_loader.PRESETS.items()
           for family, entry in by_family.items() if (preset, family) in EXPECTED}
    assert got == EXPECTED


@pytest.mark.parametrize("preset,family", sorted(EXPECTED))
def test_each_missing_file_is_named_with_folder_and_download(host, models, folders, preset, family):
    node = host.nodes["MultiRefUnifiedLoader"]()
    stem, clip = EXPECTED[(preset, family)]
    with pytest.raises(checkpoints.CheckpointError) as err:
        node.load(models[family], preset)
    message = str(err.value)
    assert message.startswith(f"preset: '{preset}' for a {family.upper()} model needs ")
    assert f"adapter file {stem}." in message and str(folders["multiref"]) in message
    assert f"CLIP vision model" in message and clip in message and str(folders["clip_vision"]) in message
    assert message.count("download https://") == 2

    # The CLIP vision file present: only the adapter is named.
    (folders["clip_vision"] / clip).write_bytes(b"")
    with pytest.raises(checkpoints.CheckpointError) as err:
        node.load(models[family], preset)
    assert "adapter file" in str(err.value) and clip not in str(err.value)
    assert "huggingface.co" in str(err.value) or "cmu.edu" in str(err.value)


def test_sdxl_only_presets_refuse_an_sd15_model(host, models, folders):
    with pytest.raises(ValueError, match="'SynCD' exists for SDXL only, the model is SD15"):
        host.nodes["MultiRefUnifiedLoader"]().load(models["sd15"], "SynCD")
    with pytest.raises(ValueError, match="'full face' exists for SD15 only"):
        host.nodes["MultiRefUnifiedLoader"]().load(models["sdxl"], "full face")


@pytest.mark.parametrize("preset,family,file_name,clip_name", [
    ("Plus", "sdxl", "ip-adapter-plus_sdxl_vit-h.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("full face", "sd15", "ip-adapter-full-face_sd15.safetensors", "clip_vit_h_14.safetensors"),
    ("MIP-Adapter", "sdxl", "model_sdxl.bin", "open_clip_ViT-bigG-14.safetensors"),
])
def test_finds_and_loads_the_files(host, models, folders, monkeypatch, preset, family, file_name,
                                   clip_name):
    """Other suffixes and other names of the same CLIP model are found. The host detects a CLIP
    vision model from real-size weights, so the tiny one stands in for its loading here."""
    layout = LAYOUT[preset]
    path, written = tc.write_checkpoint(str(folders["multiref"]), layout, family,
                                        file_format=file_name.rsplit(".", 1)[1], name=file_name)
    save_file({"stand_in": torch.zeros(1)}, str(folders["clip_vision"] / clip_name))
    (folders["clip_vision"] / "CLIP-ViT-L-14.safetensors").write_bytes(b"")  # another model
    # A longer name sharing the prefix is another file.
    tc.write_checkpoint(str(folders["multiref"]), "ip_adapter", "sdxl", name="model_sdxl_extra.bin")
    opened = []
    tiny = tiny_models.tiny_clip_vision()
    monkeypatch.setattr(unified_loader.comfy.clip_vision, "load", lambda p: opened.append(p) or tiny)
    adapter, clip_vision = host.nodes["MultiRefUnifiedLoader"]().load(models[family], preset)
    assert adapter.source == file_name and adapter.kind == layout
    assert all(torch.equal(v, written[k]) for k, v in adapter.state_dict().items())
    assert opened == [str(folders["clip_vision"] / clip_name)] and clip_vision is tiny
