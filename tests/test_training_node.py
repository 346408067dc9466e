"""MultiRefTrain in a headless prompt run (the host's executor, inference mode and all): it
trains, reports progress per step, writes its run folder, and its output model samples
differently from the input model."""
import os
import sys

import pytest
import torch

import comfy.sample
from multiref.families import tiny_models
from multiref.nodes.training import MultiRefTrain
from multiref.training import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
import training_data  # noqa: E402
from conftest import headless_host  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(data, out, steps=4):
    """out: the run folder's name inside the host's output folder."""
    return {"dataset": data, "output_dir": out, "steps": steps, "batch_size": 1,
            "grad_accumulation": 1, "learning_rate": 0.01, "lora_rank": 4, "resolution": 64,
            "save_every": 2, "keep_last": 2, "seed": 1, "gradient_checkpointing": True,
            "resume": True}


def test_train_node_runs_in_a_headless_prompt(host, tmp_path, output_folder):
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    run = output_folder / "run"
    prompt = {
        "1": {"class_type": "MultiRefTinyDemoModels", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "MultiRefTrain", "inputs": dict(
            _inputs(data, "run"), model=["1", 0], clip=["1", 1], vae=["1", 2])},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }
    progress = headless_host.ProgressPrinter(quiet=True)
    outputs = host.execute(prompt, progress)
    assert outputs["3"]["images"]  # the loss curve came out
    steps = [d["value"] for e, d in progress.events if e == "progress" and d.get("max") == 4]
    assert steps == [1, 2, 3, 4]
    assert checkpoint.saved_steps(str(run)) == [2, 4]
    for name in (checkpoint.WEIGHTS_NAME, checkpoint.CORE_LORA_NAME, "loss.png", "loss.json",
                 "summary.json", "config.json"):
        assert os.path.isfile(run / name), name


def _sample(model, clip):
    cond, _ = clip.encode_from_tokens(clip.tokenize("a photo of an apple"), return_pooled=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, 3, 4.0, "euler", "normal", [[cond, {}]],
                               [[torch.zeros_like(cond), {}]], torch.zeros(1, 4, 8, 8), seed=0,
                               disable_pbar=True)


def test_trained_model_output_changes_the_sample_and_matches_the_core_lora_file(tmp_path,
                                                                               output_folder):
    import comfy.sd
    from safetensors.torch import load_file
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    with torch.inference_mode():  # as the host runs nodes
        model, clip, vae = (tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15"),
                            tiny_models.tiny_vae())
        trained, weights, curve = MultiRefTrain().train(model, clip, vae, **_inputs(data, "r"))
        base_sample = _sample(model, clip)
        trained_sample = _sample(trained, clip)
        core = load_file(str(output_folder / "r" / checkpoint.CORE_LORA_NAME))
        loaded, _ = comfy.sd.load_lora_for_models(model, None, core, 1.0, 0.0)
        loaded_sample = _sample(loaded, clip)
    assert curve.shape == (1, 360, 640, 3)
    assert (trained_sample - base_sample).abs().max() > 1e-4
    torch.testing.assert_close(loaded_sample, trained_sample)  # the core-LoRA file is that model
    assert torch.equal(_sample(model, clip), base_sample)  # the input model is untouched


def test_trained_adapter_loads_in_the_adapter_loader_and_changes_the_sample(host, tmp_path,
                                                                           output_folder):
    """Train an adapter with MultiRefTrain, load the file with MultiRefAdapterLoader from
    models/multiref, apply it with the pack's nodes: the sample differs from the one with the
    adapter it started from."""
    import tiny_checkpoints
    from multiref.kernels.checkpoints import load_adapter
    from multiref.nodes.loaders import MultiRefAdapterLoader
    from multiref.nodes.references import MultiRefEncodeReferences, MultiRefReference
    from multiref.nodes.routing import MultiRefApplyAdapter
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    start_file, _ = tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15",
                                                      file_format="safetensors")
    models_dir = tmp_path / "models_multiref"
    models_dir.mkdir()
    host.folder_paths.add_model_folder_path("multiref", str(models_dir))
    with torch.inference_mode():  # as the host runs nodes
        model, clip, vae = (tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15"),
                            tiny_models.tiny_vae())
        clip_vision = tiny_models.tiny_clip_vision()
        start = load_adapter(start_file)
        _, weights, _ = MultiRefTrain().train(model, clip, vae, **_inputs(data, "r"),
                                              adapter=start, clip_vision=clip_vision)
        os.replace(weights, models_dir / "trained.safetensors")
        (trained,) = MultiRefAdapterLoader().load("trained.safetensors")
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
        (refs,) = MultiRefReference().make(image, "apple", 1.0, 0.0, 1.0)
        samples = []
        for adapter in (start, trained):
            (encoded,) = MultiRefEncodeReferences().encode(refs, adapter, clip_vision, model, 0)
            (patched,) = MultiRefApplyAdapter().apply(model, adapter, encoded, clip, "sum", 1.0,
                                                      0.0, 1.0)
            samples.append(_sample(patched, clip))
    assert trained.kind == "multiref" and trained.has_self_attn_lora
    assert (samples[0] - samples[1]).abs().max() > 1e-4


def test_cancel_saves_a_resumable_state_and_the_next_run_resumes(tmp_path, output_folder):
    """ComfyUI's cancel (interrupt_current_processing) stops the node after the current step
    with the state saved; queueing it again continues from there."""
    import comfy.model_management as mm
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    inputs = dict(_inputs(data, "r", steps=4), save_every=100)
    with torch.inference_mode():
        model, clip, vae = (tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15"),
                            tiny_models.tiny_vae())
        mm.interrupt_current_processing(True)
        try:
            with pytest.raises(Exception) as stopped:
                MultiRefTrain().train(model, clip, vae, **inputs)
        finally:
            mm.interrupt_current_processing(False)
        assert "Interrupt" in type(stopped.value).__name__
        assert checkpoint.saved_steps(str(output_folder / "r")) == [1]
        MultiRefTrain().train(model, clip, vae, **inputs)
    assert checkpoint.saved_steps(str(output_folder / "r")) == [1, 4]
    import json
    assert [s for s, _ in json.loads((output_folder / "r" / "loss.json").read_text())] == [1, 2, 3, 4]


def test_map_constraint_inputs_reach_the_run(tmp_path, output_folder):
    """The node's optional map-constraint inputs become the run's settings (config.json), and
    the run trains with them on a two-object dataset."""
    import json
    data = training_data.write_two_object_dataset(str(tmp_path / "data"), groups=2)
    with torch.inference_mode():
        model, clip, vae = (tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15"),
                            tiny_models.tiny_vae())
        MultiRefTrain().train(model, clip, vae, **_inputs(data, "m", steps=2),
                              text_map_weight=0.5, map_layers=" middle, output ")
    saved = json.loads((output_folder / "m" / "config.json").read_text())
    assert (saved["text_map_weight"], saved["image_map_weight"], saved["map_layers"]) == \
        (0.5, 0.0, ["middle", "output"])
