"""MultiRef Save / Load Encoded References: references reload bit-identical from the output or
input folder; names leading out of the output folder, foreign files, other format versions and
another adapter are refused by name."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_checkpoints as tc
from multiref.kernels import checkpoints, encoded_files
from multiref.kernels.references import ReferenceInputError
from multiref.kernels.weights_files import CheckpointError
from multiref.families import tiny_models

FIELDS = ("image_tokens", "uncond_tokens", "latents", "masks", "attention_mask", "tile_regions",
          "class_embedding")


@pytest.fixture(scope="module")
def encoded(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    adapter = checkpoints.load_adapter(tc.write_checkpoint(str(folder), "ip_adapter_plus", "sd15")[0])
    gen = torch.Generator().manual_seed(5)
    mask = torch.zeros(2, 64, 64)
    mask[:, 8:40, 16:48] = 1
    make = host.nodes["MultiRefReference"]().make
    refs = make(torch.rand(2, 64, 64, 3, generator=gen), "dog", 0.8, 0.1, 0.9, mask=mask,
                attention_mask=torch.rand(3, 24, 40, generator=gen))[0]
    refs = make(torch.rand(1, 64, 64, 3, generator=gen), "red hat", 1.3, 0.0, 0.55, previous=refs,
                views="one per batch image")[0]
    out = host.nodes["MultiRefEncodeReferences"]().encode(
        refs, adapter, tiny_models.tiny_clip_vision(), tiny_models.tiny_unet("sd15"), 1,
        vae=tiny_models.tiny_vae(), crop="tiles on their regions")[0]
    return adapter, out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in FIELDS:
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            if u is not None:
                assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), field
        for field in ("phrase", "weight", "start_percent", "end_percent", "adapter_fingerprint",
                      "tokens_per_view", "tokens_per_tile"):
            assert getattr(x, field) == getattr(y, field), field


def test_saved_references_reload_bit_identical(host, output_folder, encoded):
    adapter, refs = encoded
    assert refs[0].masks is not None and refs[1].masks is None and refs[0].latents is not None
    assert refs[0].attention_mask.shape == (3, 24, 40) and refs[1].attention_mask is None
    (name,) = host.nodes["MultiRefSaveEncodedReferences"]().save(refs, "people/dog")["result"]
    assert name == "people/dog_00001_.references.safetensors [output]"
    path = output_folder / "people" / "dog_00001_.references.safetensors"
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    loader = host.nodes["MultiRefLoadEncodedReferences"]
    assert name in loader.INPUT_TYPES()["required"]["reference_file"][0]
    (loaded,) = loader().load(name, adapter=adapter)
    assert_same(loaded, refs)
    # The file holds what the format says, written out independently.
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "multiref-encoded-references" and metadata["format_version"] == "1"
    assert metadata["adapter_fingerprint"] == adapter.fingerprint
    assert json.loads(metadata["references"])[1] == {
        "phrase": "red hat", "weight": 1.3, "start_percent": 0.0, "end_percent": 0.55,
        "tokens_per_view": 64, "tokens_per_tile": 16, "latents": True, "masks": False,
        "attention_mask": False, "tile_regions": True,
        "class_embedding": True}
    assert sorted(load_file(str(path))) == sorted(
        ["ref.0.image_tokens", "ref.0.uncond_tokens", "ref.0.latents", "ref.0.masks",
         "ref.0.attention_mask", "ref.0.tile_regions", "ref.1.tile_regions",
         "ref.1.image_tokens", "ref.1.uncond_tokens", "ref.1.latents",
         "ref.0.class_embedding", "ref.1.class_embedding"])
    # A second save counts on; a copy in the input folder (another machine) loads the same.
    (again,) = host.nodes["MultiRefSaveEncodedReferences"]().save(refs, "people/dog")["result"]
    assert again == "people/dog_00002_.references.safetensors [output]"
    inputs = output_folder.parent / "input"
    inputs.mkdir()
    saved_input = host.folder_paths.get_input_directory()
    host.folder_paths.set_input_directory(str(inputs))
    try:
        shutil.copy(path, inputs / "dog.references.safetensors")
        assert "dog.references.safetensors" in loader.INPUT_TYPES()["required"]["reference_file"][0]
        assert_same(loader().load("dog.references.safetensors")[0], refs)
    finally:
        host.folder_paths.set_input_directory(saved_input)


@pytest.mark.parametrize("prefix", ["../outside", "/tmp/abs", "a/../../b", "", ".", "link/x"])
def test_names_leading_out_of_the_output_folder_are_refused(host, output_folder, encoded, prefix,
                                                            tmp_path):
    (output_folder / "link").symlink_to(tmp_path)
    with pytest.raises(ReferenceInputError, match="filename_prefix"):
        host.nodes["MultiRefSaveEncodedReferences"]().save(encoded[1], prefix)
    assert not list(tmp_path.glob("**/*.references.safetensors"))


def test_files_written_before_attention_masks_load_without_one(encoded, tmp_path):
    """Format version 1 files of earlier versions of the pack announce no attention mask."""
    _, refs = encoded
    path = str(tmp_path / "old.references.safetensors")
    encoded_files.save(refs, path)
    tensors = {k: v for k, v in load_file(path).items()
               if not k.endswith((".attention_mask", ".tile_regions"))}
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    entries = json.loads(metadata["references"])
    for entry in entries:
        for name in ("attention_mask", "tokens_per_view", "tile_regions", "tokens_per_tile"):
            del entry[name]
    save_file(tensors, path, metadata=dict(metadata, references=json.dumps(entries)))
    loaded = encoded_files.load(path)
    assert [r.attention_mask for r in loaded] == [None, None]
    assert [r.tokens_per_view for r in loaded] == [None, None]
    assert [r.tile_regions for r in loaded] == [None, None]
    assert torch.equal(loaded[0].masks, refs[0].masks)


def test_foreign_and_damaged_files_are_refused(host, output_folder, encoded, tmp_path):
    adapter, refs = encoded
    path = str(tmp_path / "r.references.safetensors")
    encoded_files.save(refs, path)
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata())
    cases = {"version": (tensors, dict(metadata, format_version="9"), "format version 9"),
             "format": (tensors, dict(metadata, format="multiref-adapter"), "not a file of encoded"),
             "missing": ({k: v for k, v in tensors.items() if k != "ref.0.masks"}, metadata,
                         "do not match its metadata"),
             "extra": (dict(tensors, **{"ref.5.image_tokens": torch.zeros(1)}), metadata,
                       "unexpected tensors")}
    for case, (t, m, message) in cases.items():
        bad = str(tmp_path / f"{case}.references.safetensors")
        save_file(t, bad, metadata=m)
        with pytest.raises(CheckpointError, match=message):
            encoded_files.load(bad)
    pickle = tmp_path / "r.pt"
    torch.save({"ref.0.image_tokens": torch.zeros(1)}, str(pickle))
    with pytest.raises(CheckpointError, match=".safetensors files only"):
        encoded_files.load(str(pickle))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="damaged"):
        encoded_files.load(path)


def test_another_adapter_is_refused(host, output_folder, encoded, tmp_path):
    _, refs = encoded
    (name,) = host.nodes["MultiRefSaveEncodedReferences"]().save(refs, "refs")["result"]
    other = checkpoints.load_adapter(tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15",
                                                         seed=9)[0])
    with pytest.raises(ReferenceInputError, match="encoded with another adapter"):
        host.nodes["MultiRefLoadEncodedReferences"]().load(name, adapter=other)
    with pytest.raises(ReferenceInputError, match="not inside the output folder"):
        host.nodes["MultiRefLoadEncodedReferences"]().load("../x.references.safetensors [output]")
