"""Bad inputs, faults and hostile files, as users hit them: each is refused (or survived) with a
message naming the input and the fix. docs/BAD_INPUTS.md lists every case with its test here."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import tiny_checkpoints as tc
import training_data
from conftest import ROOT, headless_host
from multiref.kernels.checkpoints import CheckpointError
from multiref.kernels.references import Reference, ReferenceInputError
from multiref.families import tiny_models
from multiref.nodes.loaders import MultiRefAdapterLoader
from multiref.nodes.training import MultiRefTrain
from multiref.training import checkpoint, cli, loop, manifest
from multiref.training.config import TrainConfig, TrainConfigError
from test_training import data, tiny_models_sd15  # noqa: F401  (data: the shared dataset fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = os.path.dirname(os.path.abspath(__file__))


def settings(data, out, **kw):
    values = dict(dataset=data, output_dir=str(out), steps=4, batch_size=1, learning_rate=2e-3,
                  lora_rank=4, resolution=64, save_every=2, keep_last=3, seed=3)
    values.update(kw)
    return values


# ---------------------------------------------------------------------------------------------
# 1. Hostile pickles: never run, refused naming the file

class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# Both pickle formats torch writes: zip (torch >= 1.6) and the legacy stream of older files.
LEGACY = {".bin": False, ".ckpt": True, ".pt": False, ".pth": True}


def write_hostile(path, marker, payload_key="weight"):
    torch.save({"state_dict": {payload_key: _WritesMarker(marker)}, "global_step": 1}, str(path),
               _use_new_zipfile_serialization=not LEGACY[os.path.splitext(str(path))[1]])
    return str(path)


def run_cli(config_path, caplog, *flags):
    caplog.clear()
    code = cli.main(["--config", str(config_path), *flags])
    return code, "\n".join(r.getMessage() for r in caplog.records if r.name == "multiref")


def write_config(folder, data, **kw):
    path = folder / "run.json"
    path.write_text(json.dumps(dict(settings(data, folder / "run"), **kw)))
    return path


@pytest.mark.parametrize("suffix", list(LEGACY))
def test_trainer_model_checkpoint_pickle_is_refused_unrun(tmp_path, data, caplog, suffix):
    marker = tmp_path / "marker"
    hostile = write_hostile(tmp_path / f"sd_xl_base_1.0{suffix}", marker)
    code, log = run_cli(write_config(tmp_path, data, model={"checkpoint": hostile}), caplog)
    assert code == 2 and not marker.exists()
    assert f"refused to load sd_xl_base_1.0{suffix} (model.checkpoint: {hostile})" in log
    assert "(it calls io.open)" in log and "Use a .safetensors version of the file" in log


@pytest.mark.parametrize("suffix", list(LEGACY))
def test_trainer_clip_vision_pickle_is_refused_unrun(tmp_path, data, caplog, suffix):
    marker = tmp_path / "marker"
    adapter, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15", "safetensors")
    hostile = write_hostile(tmp_path / f"CLIP-ViT-H-14-laion2B-s32B-b79K{suffix}", marker)
    code, log = run_cli(write_config(tmp_path, data, adapter=adapter, clip_vision=hostile), caplog)
    assert code == 2 and not marker.exists()
    assert f"refused to load CLIP-ViT-H-14-laion2B-s32B-b79K{suffix} (clip_vision: {hostile})" in log


@pytest.mark.parametrize("suffix", list(LEGACY))
def test_trainer_adapter_pickle_is_refused_unrun(tmp_path, data, caplog, suffix):
    marker = tmp_path / "marker"
    hostile = write_hostile(tmp_path / f"ip-adapter-plus_sd15{suffix}", marker)
    clip_vision = tmp_path / "clip.safetensors"
    clip_vision.write_bytes(b"")  # only has to exist: the adapter is read first
    code, log = run_cli(write_config(tmp_path, data, adapter=hostile, clip_vision=str(clip_vision)),
                        caplog)
    assert code == 2 and not marker.exists()
    assert f"refused to load ip-adapter-plus_sd15{suffix} (adapter: {hostile})" in log


@pytest.mark.parametrize("name", ["ip-adapter_sd15", "multiref_lora"])  # an adapter, a LoRA file
@pytest.mark.parametrize("suffix", list(LEGACY))
def test_adapter_loader_node_pickle_is_refused_unrun(host, tmp_path, name, suffix):
    folder = tmp_path / "multiref"
    # In a subfolder of this test's own: other tests' folders may hold a file of the same name.
    (folder / tmp_path.name).mkdir(parents=True)
    host.folder_paths.add_model_folder_path("multiref", str(folder))
    marker = tmp_path / "marker"
    hostile = write_hostile(folder / tmp_path.name / f"{name}{suffix}", marker,
                            payload_key="self_attn_lora.0")
    with pytest.raises(CheckpointError) as err:
        MultiRefAdapterLoader().load(f"{tmp_path.name}/{name}{suffix}")
    assert not marker.exists()
    assert str(err.value).startswith(f"refused to load {name}{suffix} (adapter: {hostile})")


def test_clip_vision_bin_still_loads_weights_only(tmp_path, data, monkeypatch):
    """CLIP vision is often shipped as pytorch_model.bin: a plain state dict passes the check and
    reaches the host's loader (recorded here: the host cannot build a tiny CLIP from a file)."""
    import comfy.clip_vision
    adapter, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15", "safetensors")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2)}, path,
               _use_new_zipfile_serialization=False)
    handed = []
    monkeypatch.setattr(comfy.clip_vision, "load",
                        lambda p: handed.append(p) or tiny_models.tiny_clip_vision())
    config = TrainConfig(**settings(data, tmp_path / "run", adapter=adapter, clip_vision=str(path)))
    models = cli.load_models(config)
    assert handed == [str(path)] and models.adapter is not None


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    loop.train(TrainConfig(**settings(data, out, steps=2)), tiny_models_sd15())
    return out


def test_resume_state_pickle_is_refused_unrun(finished_run, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = run / "checkpoints" / "step-000002" / checkpoint.STATE_NAME
    marker = tmp_path / "marker"
    torch.save({"trainable": _WritesMarker(marker)}, state)
    with pytest.raises(CheckpointError) as err:
        loop.train(TrainConfig(**settings(data, run, steps=2)), tiny_models_sd15())
    assert not marker.exists()
    assert str(err.value).startswith(f"refused to load training_state.pt (resume state: {state})")
    assert f"delete the folder {state.parent}" in str(err.value)


def test_cached_encodings_pickle_is_refused_unrun(finished_run, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (cache,) = glob.glob(str(run / "cache" / "encoded-*.pt"))
    marker = tmp_path / "marker"
    torch.save({"groups": [_WritesMarker(marker)]}, cache)
    with pytest.raises(CheckpointError) as err:
        loop.train(TrainConfig(**settings(data, run, steps=2)), tiny_models_sd15())
    assert not marker.exists()
    assert str(err.value).startswith(
        f"refused to load {os.path.basename(cache)} (cached encodings: {cache})")
    assert "delete it; the dataset is then encoded again" in str(err.value)


# ---------------------------------------------------------------------------------------------
# 2. The training node writes only inside ComfyUI's output folder

@pytest.mark.parametrize("output_dir", ["../elsewhere", "a/../../elsewhere", "run/..\\..\\elsewhere",
                                        "ABSOLUTE"])
def test_train_node_refuses_output_dir_outside_the_output_folder(output_folder, tmp_path, data,
                                                                 output_dir):
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / "config.json").write_text("{}")
    output_dir = str(victim) if output_dir == "ABSOLUTE" else output_dir
    inputs = dict(settings(data, output_dir), grad_accumulation=1, gradient_checkpointing=True,
                  resume=True)
    with pytest.raises(TrainConfigError) as err:
        MultiRefTrain().train(None, None, None, **inputs)  # refused before any model is touched
    assert str(err.value).startswith(f"output_dir {output_dir!r}: give a folder inside ComfyUI's "
                                     f"output folder ({os.path.realpath(output_folder)})")
    assert os.listdir(victim) == ["config.json"] and (victim / "config.json").read_text() == "{}"
    assert os.listdir(output_folder) == []


def test_train_node_refuses_a_link_leading_out(output_folder, tmp_path, data):
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    os.symlink(victim, output_folder / "link")
    inputs = dict(settings(data, "link/run"), grad_accumulation=1, gradient_checkpointing=True,
                  resume=True)
    with pytest.raises(TrainConfigError) as err:
        MultiRefTrain().train(None, None, None, **inputs)
    assert f"leads to {os.path.realpath(victim / 'run')}, outside ComfyUI's output folder" in str(err.value)
    assert os.listdir(victim) == []


# ---------------------------------------------------------------------------------------------
# 3. A fresh run never continues another one; a changed resume lists every difference

def test_fresh_run_moves_the_earlier_run_aside_and_never_resumes_it(data, tmp_path, caplog):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, steps=4, learning_rate=1e-3)
    assert run_cli(config, caplog)[0] == 0                      # the earlier run: steps 2 and 4
    config.write_text(json.dumps(dict(json.loads(config.read_text()), learning_rate=5e-3, steps=6)))
    calls = []

    def ctrl_c_at_step_1():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
    fresh = TrainConfig(**settings(data, run, steps=6, learning_rate=5e-3, resume=False))
    with pytest.raises(KeyboardInterrupt):                      # `--no-resume`, then Ctrl-C
        loop.train(fresh, tiny_models_sd15(), check_interrupt=ctrl_c_at_step_1)
    (moved,) = os.listdir(run / checkpoint.REPLACED_DIR)
    assert checkpoint.saved_steps(str(run / checkpoint.REPLACED_DIR / moved)) == [2, 4]
    assert json.loads((run / checkpoint.REPLACED_DIR / moved / "config.json").read_text())[
        "learning_rate"] == 1e-3
    assert checkpoint.saved_steps(str(run)) == [1]
    code, log = run_cli(config, caplog)                         # the same command again
    assert code == 0 and f"resumed {run} at step 1" in log
    assert [s for s, _ in json.loads((run / "loss.json").read_text())] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 5e-3


def test_resume_with_changed_settings_lists_every_difference(finished_run, data, tmp_path):
    other = training_data.write_object_dataset(str(tmp_path / "other"), groups=2, refs=1, seed=5)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    changed = TrainConfig(**settings(other, run, steps=2, lora_rank=8, learning_rate=1e-3,
                                     resolution=128))
    with pytest.raises(TrainConfigError) as err:
        loop.train(changed, tiny_models_sd15())
    lines = str(err.value).splitlines()
    assert lines[0] == (f"output_dir {run} holds a run saved at step 2 with other settings than "
                        "this one (4 difference(s)):")
    assert lines[1:5] == [f"  - dataset: {data!r} in the saved run, {other!r} now",
                          "  - learning_rate: 0.002 in the saved run, 0.001 now",
                          "  - lora_rank: 4 in the saved run, 8 now",
                          "  - resolution: 64 in the saved run, 128 now"]
    assert "size mismatch" not in str(err.value) and "turn resume off" in lines[5]


def test_resume_of_a_checkpoint_without_settings_reports_shapes_in_one_line(finished_run, data,
                                                                            tmp_path):
    """Checkpoints of an earlier trainer version carry no settings: a shape mismatch is still one
    message, not the module's size-mismatch traceback."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state_file = run / "checkpoints" / "step-000002" / checkpoint.STATE_NAME
    state = torch.load(state_file, weights_only=True)
    del state["run_identity"]
    torch.save(state, state_file)
    with pytest.raises(TrainConfigError) as err:
        loop.train(TrainConfig(**settings(data, run, steps=2, lora_rank=8)), tiny_models_sd15())
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"output_dir {run}: the run saved at step 2 trained weights "
                                     "of other shapes than this model and settings make")


# ---------------------------------------------------------------------------------------------
# 4. NaN / inf in any mask (and scale) is refused by name; no prompt ends in a NaN picture

@pytest.fixture
def adapter_file(host, tmp_path):
    folder = tmp_path / "multiref"
    folder.mkdir()
    host.folder_paths.add_model_folder_path("multiref", str(folder))
    tc.write_checkpoint(str(folder), "ip_adapter_plus", "sd15", "safetensors",
                        name="reliability_plus.safetensors")
    if hasattr(host.folder_paths, "invalidate_cache"):
        host.folder_paths.invalidate_cache("multiref")
    return "reliability_plus.safetensors"


class CaptureLatentForTests:
    """An output node keeping the sampled latent of the last prompt."""
    captured = []
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "keep"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def keep(self, samples):
        CaptureLatentForTests.captured.append(samples["samples"].clone())
        return {}


def sampling_graph(adapter_name, seed, patch):
    """Tiny SD1.5 models, one reference (an input picture), a patch node, KSampler, capture."""
    graph = {
        "1": {"class_type": "MultiRefTinyDemoModels", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "MultiRefAdapterLoader", "inputs": {"adapter_name": adapter_name}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "reliability_ref.png"}},
        "4": {"class_type": "MultiRefReference", "inputs": {
            "image": ["3", 0], "phrase": "dog", "weight": 1.0, "start_percent": 0.0,
            "end_percent": 1.0}},
        "5": {"class_type": "MultiRefEncodeReferences", "inputs": {
            "references": ["4", 0], "adapter": ["2", 0], "clip_vision": ["1", 3],
            "model": ["1", 0], "mask_dilation": 0, "vae": ["1", 2]}},
        "6": patch,
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": seed, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["7", 0], "negative": ["8", 0],
            "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "CaptureLatentForTests", "inputs": {"samples": ["10", 0]}},
    }
    return graph


@pytest.fixture
def graph_host(host, tmp_path, adapter_file):
    """The host with the capture node and an input picture in a folder of this test."""
    saved_input = host.folder_paths.get_input_directory()
    inputs = tmp_path / "input"
    inputs.mkdir()
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 40, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(inputs / "reliability_ref.png")
    host.folder_paths.set_input_directory(str(inputs))
    host.nodes["CaptureLatentForTests"] = CaptureLatentForTests
    yield host
    host.folder_paths.set_input_directory(saved_input)


def test_nan_region_mask_fails_the_prompt_naming_region_masks(graph_host, adapter_file):
    routing = {"class_type": "MultiRefApplyAdapter", "inputs": {
        "model": ["1", 0], "adapter": ["2", 0], "references": ["5", 0], "clip": ["1", 1],
        "mode": "mask", "scale": 0.7, "start_percent": 0.0, "end_percent": 1.0,
        "region_masks": ["12", 0]}}
    graph = sampling_graph(adapter_file, 42, routing)
    graph["12"] = {"class_type": "SolidMask", "inputs": {"value": float("nan"), "width": 64,
                                                         "height": 64}}
    CaptureLatentForTests.captured.clear()
    with pytest.raises(headless_host.HostError, match=r"region_masks: 4096 of 4096 values are "
                                                      r"NaN or infinite"):
        graph_host.execute(graph)
    assert CaptureLatentForTests.captured == []  # no picture came out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_masks_are_refused_by_name(host, bad):
    from multiref.nodes.msa import apply_msa
    from multiref.nodes.routing import _region_masks
    image = torch.rand(1, 32, 32, 3)
    mask = torch.ones(1, 32, 32)
    mask[0, 3, 4] = bad
    with pytest.raises(ReferenceInputError, match=r"^reference mask: 1 of 1024 values are NaN"):
        Reference(images=image, masks=mask)
    with pytest.raises(ReferenceInputError, match=r"^region_masks: 1 of 1024 values are NaN"):
        _region_masks(mask, 1)
    with pytest.raises(ReferenceInputError, match=r"^batch_masks: 1 of 1024 values are NaN"):
        apply_msa(tiny_models.tiny_unet("sd15"), None, 1.0, 0.0, 1.0, False, "all", "batch",
                  batch_masks=mask)


def test_nan_scales_are_refused_by_name(host, tmp_path):
    from multiref.kernels.checkpoints import load_adapter
    from multiref.nodes.guidance import MultiRefGuider
    from multiref.nodes.references import MultiRefEncodeReferences
    from multiref.nodes.routing import MultiRefApplyAdapter
    model = tiny_models.tiny_unet("sd15")
    with pytest.raises(ValueError, match=r"^image_scale: nan is not a number"):
        MultiRefGuider(model, 7.5, float("nan"), 0.0, True, "three-branch")
    adapter = load_adapter(tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15",
                                               "safetensors")[0])
    (encoded,) = MultiRefEncodeReferences().encode(
        (Reference(images=torch.rand(1, 32, 32, 3), phrase="dog"),), adapter,
        tiny_models.tiny_clip_vision(), model, 0)
    with pytest.raises(ValueError, match=r"^scale: nan is not a number"):
        MultiRefApplyAdapter().apply(model, adapter, encoded, tiny_models.tiny_text_encoder("sd15"),
                                     "sum", float("nan"), 0.0, 1.0)
    with pytest.raises(ReferenceInputError, match=r"^reference weight: nan is not a number"):
        Reference(images=torch.rand(1, 32, 32, 3), weight=float("nan"))


def test_nan_out_of_the_vae_is_named(host, tmp_path):
    from multiref.kernels.checkpoints import load_adapter
    from multiref.nodes.references import MultiRefEncodeReferences
    path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15", "safetensors")
    vae = tiny_models.tiny_vae()
    with torch.no_grad():
        vae.first_stage_model.encoder.conv_in.bias.fill_(float("nan"))  # a VAE that overflows
    refs = (Reference(images=torch.rand(1, 32, 32, 3), phrase="dog"),)
    with pytest.raises(ReferenceInputError, match=r"^vae \(reference 1 'dog'\): 64 of 64 values "
                                                  r"are NaN or infinite; the VAE overflows"):
        MultiRefEncodeReferences().encode(refs, load_adapter(path), tiny_models.tiny_clip_vision(),
                                          tiny_models.tiny_unet("sd15"), 0, vae=vae)


# ---------------------------------------------------------------------------------------------
# 5. The same prompt gives the same picture whatever ran before

def test_msa_prompt_is_bit_identical_after_other_prompts(graph_host, adapter_file):
    msa = {"class_type": "MultiRefApplyMSA", "inputs": {
        "model": ["1", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
        "first_step_unmasked": False, "layers": "all", "mode": "references",
        "references": ["5", 0]}}
    CaptureLatentForTests.captured.clear()
    for seed in (42, 7, 42):  # each prompt runs in a fresh executor: nothing is cached between
        graph_host.execute(sampling_graph(adapter_file, seed, msa))
    first, other, again = CaptureLatentForTests.captured
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # the seed does matter


# ---------------------------------------------------------------------------------------------
# 6. Tiny references: a named error before anything runs

@pytest.mark.parametrize("side", [1, 7, 15])
def test_tiny_reference_with_vae_is_refused_before_encoding(host, tmp_path, side):
    from multiref.kernels.checkpoints import load_adapter
    from multiref.nodes.references import MultiRefEncodeReferences
    path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15", "safetensors")
    adapter, model = load_adapter(path), tiny_models.tiny_unet("sd15")
    clip_vision, vae = tiny_models.tiny_clip_vision(), tiny_models.tiny_vae()
    refs = (Reference(images=torch.rand(1, 64, 64, 3), phrase="cat"),
            Reference(images=torch.rand(1, side, side, 3), phrase="dog"))
    with pytest.raises(ReferenceInputError) as err:
        MultiRefEncodeReferences().encode(refs, adapter, clip_vision, model, 0, vae=vae)
    assert str(err.value).startswith(
        f"reference 2 ('dog') image: {side}x{side} pixels is too small for the VAE: references "
        "need at least 16x16 pixels")
    assert "Upscale Image" in str(err.value)
    # Without a VAE or a mask, CLIP vision resizes any picture: the same reference encodes.
    ((_, small),) = MultiRefEncodeReferences().encode(refs, adapter, clip_vision, model, 0)
    assert small.latents is None and small.image_tokens.shape[1] == 16


# ---------------------------------------------------------------------------------------------
# 7. Pixel range, empty masks, dataset problems, interrupted saves

@pytest.mark.parametrize("scale, offset, hint", [(255.0, 0.0, "divided by 255"),
                                                 (2.0, -1.0, "(x + 1) / 2")])
def test_pixels_on_another_scale_are_refused(scale, offset, hint):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * scale + offset
    with pytest.raises(ReferenceInputError, match=r"^reference image: pixel values run from") as err:
        Reference(images=image)
    assert hint in str(err.value)
    Reference(images=image.clamp(-0.2, 1.2) if scale == 2.0 else (image / 255).clamp(max=1.1))


def test_empty_mask_messages_say_what_can_help():
    from multiref.kernels.references import latent_masks
    blank = torch.zeros(1, 64, 64)
    with pytest.raises(ReferenceInputError) as err:
        latent_masks(blank, 1, (8, 8), dilation=3)
    assert "view(s) [0] are blank (no pixel above 0.5): paint the object white" in str(err.value)
    assert "mask_dilation" not in str(err.value)
    speck = torch.zeros(2, 64, 64)
    speck[1, 10:13, 10:13] = 1
    with pytest.raises(ReferenceInputError) as err:
        latent_masks(speck, 2, (8, 8), dilation=3)
    message = str(err.value)
    assert "view(s) [0] are blank" in message
    assert ("in view(s) [1] the object covers only [9] pixel(s), less than half of any 8x8-pixel "
            "latent cell") in message
    assert "use a larger image" in message and "mask_dilation cannot help" in message


def test_every_problem_of_every_sample_is_listed_at_once(tmp_path):
    path = training_data.write_object_dataset(str(tmp_path), groups=2, refs=2)
    data = json.loads(open(path).read())
    first, second = data["samples"]
    del first["caption"]                                        # structure
    first["target"]["image"] = "missing.png"                    # a file
    Image.new("L", (10, 12)).save(tmp_path / "g0_v1_mask.png")  # a size mismatch
    second["references"][1]["image"] = "gone.png"
    data["samples"].append({"kind": "scene"})
    open(path, "w").write(json.dumps(data))
    with pytest.raises(manifest.DatasetError) as err:
        manifest.load(path, max_references=1)
    assert err.value.problems == [
        "samples[0]: `caption` must be a non-empty string",
        f"samples[0] target image: file not found: {tmp_path / 'missing.png'}",
        f"samples[0] reference 0: mask {tmp_path / 'g0_v1_mask.png'} is 10x12 but its image "
        f"{tmp_path / 'g0_v1.png'} is 64x64; masks must match",
        "samples[0]: 2 references, more than max_references (1); raise max_references or split "
        "the sample",
        f"samples[1] reference 1 image: file not found: {tmp_path / 'gone.png'}",
        "samples[1]: 2 references, more than max_references (1); raise max_references or split "
        "the sample",
        "samples[2]: `caption` must be a non-empty string",
        "samples[2]: `kind` must be 'object' or 'multi_object', got 'scene'"]


KILLED_DURING_SAVE = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import conftest, torch
torch.set_num_threads(1)
from multiref.families import tiny_models
from multiref.training import checkpoint, loop
from multiref.training.config import TrainConfig
real, calls = checkpoint.save_file, []

def save_file(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:  # the weights of the second checkpoint: half written, then kill -9
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)

checkpoint.save_file = save_file
loop.train(TrainConfig(**json.loads(sys.argv[1])), loop.Models(
    tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(), tiny_models.tiny_text_encoder("sd15"),
    "sd15"))
"""


def test_kill_during_a_save_is_cleaned_up_and_the_summary_has_the_real_step(data, tmp_path):
    run = tmp_path / "run"
    values = settings(data, run, steps=4, save_every=2)
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE.format(tests=TESTS),
                             json.dumps(values)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (orphan,) = glob.glob(str(run / "checkpoints" / ".step-*"))
    assert sorted(os.listdir(orphan))[0].startswith(".multiref-")  # the half-written .tmp
    assert checkpoint.saved_steps(str(run)) == [2]
    (run / ".multiref-loss.tmp").write_text("[")  # as a kill during a final write leaves
    result = loop.train(TrainConfig(**values), tiny_models_sd15())
    assert glob.glob(str(run / "checkpoints" / ".*")) + glob.glob(str(run / ".multiref-*")) == []
    assert [s for s, _ in result.losses] == [1, 2, 3, 4] and checkpoint.saved_steps(str(run)) == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_session"]) == (4, 2)
    loop.train(TrainConfig(**values), tiny_models_sd15())  # the same command once more: nothing to do
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_session"], summary["steps_per_s"]) == (4, 0, None)
