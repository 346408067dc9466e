"""The trainer with cls_text (MM-Diff's CLS text fusion trained with the adapter), on the host's
tiny models: off changes nothing, on the untrained fusion leaves the first loss as it is, the
fusion trains, is saved in its own file format and resumes exactly."""
import os
import sys

import pytest
import torch

import tiny_checkpoints
from multiref.families import tiny_models
from multiref.kernels import cls_text
from multiref.kernels.checkpoints import load_adapter
from multiref.training import checkpoint, config as config_mod, loop
from multiref.training.config import TrainConfig, TrainConfigError

sys.path.insert(0, os.path.dirname(__file__))
import training_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(one_reference_dataset):
    return one_reference_dataset


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path_factory.mktemp("adapter")),
                                                "ip_adapter_plus", "sd15",
                                                file_format="safetensors")
    return path


def models(adapter_file, with_adapter=True):
    return loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(),
                       tiny_models.tiny_text_encoder("sd15"), "sd15",
                       tiny_models.tiny_clip_vision() if with_adapter else None,
                       load_adapter(adapter_file) if with_adapter else None)


def config(data, out, **kw):
    # No dropout: every row is augmented, so the comparisons below see the fusion at every step.
    settings = dict(dataset=data, output_dir=str(out), steps=4, batch_size=1, learning_rate=2e-2,
                    lora_rank=4, resolution=64, save_every=2, keep_last=2, seed=3,
                    text_dropout=0.0, image_dropout=0.0, both_dropout=0.0)
    settings.update(kw)
    return TrainConfig(**settings)


def test_off_leaves_identity_and_parameters_as_they_were(data, adapter_file, tmp_path):
    off = config(data, tmp_path / "off")
    identity = config_mod.run_identity(off, "sd15", "x")
    assert "cls_text" not in identity  # runs saved before the setting existed still resume
    assert "cls_text" in config_mod.run_identity(config(data, tmp_path, cls_text=True), "sd15", "x")
    result = loop.train(config(data, tmp_path / "off", steps=1, save_every=1), models(adapter_file))
    assert result.cls_text_file is None
    assert not os.path.exists(os.path.join(str(tmp_path / "off"), checkpoint.CLS_TEXT_NAME))
    state = torch.load(os.path.join(str(tmp_path / "off"), "checkpoints", "step-000001",
                                    checkpoint.STATE_NAME), weights_only=True)
    assert not any(k.startswith("cls_fusion") for k in state["trainable"])


def test_untrained_fusion_leaves_the_first_loss_unchanged(data, adapter_file, tmp_path):
    """At init fused == word, so the augmented captions equal the cached plain ones and the
    first step's loss is the same (stated tolerance: the two text paths may round apart)."""
    off = loop.train(config(data, tmp_path / "off", steps=1, save_every=1), models(adapter_file))
    on = loop.train(config(data, tmp_path / "on", steps=1, save_every=1, cls_text=True),
                    models(adapter_file))
    assert abs(off.losses[0][1] - on.losses[0][1]) < 1e-6, (off.losses, on.losses)


def test_fusion_trains_saves_and_resumes_exactly(data, adapter_file, tmp_path):
    straight = loop.train(config(data, tmp_path / "straight", cls_text=True), models(adapter_file))
    fusion = cls_text.load(straight.cls_text_file)
    assert fusion.family == "sd15" and fusion.image_width == tiny_models.CLIP_VISION_PROJECTION
    last = fusion.encoders["l"].mlp[3].weight
    assert last.abs().sum() > 0  # it moved from its zero start
    in_checkpoint = cls_text.load(os.path.join(str(tmp_path / "straight"), "checkpoints",
                                               "step-000004", checkpoint.CLS_TEXT_NAME))
    for name, value in fusion.state_dict().items():
        assert torch.equal(in_checkpoint.state_dict()[name], value), name

    run = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(data, run, save_every=100, cls_text=True), models(adapter_file),
                   check_interrupt=training_data.interrupt_at(2))
    assert checkpoint.saved_steps(str(run)) == [2]
    with pytest.raises(TrainConfigError, match="cls_text: True in the saved run"):
        loop.train(config(data, run), models(adapter_file))
    resumed = loop.train(config(data, run, cls_text=True), models(adapter_file))
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    again = cls_text.load(resumed.cls_text_file)
    for name, value in fusion.state_dict().items():
        # Same draws, same optimizer state: equal to float rounding (stated tolerance 1e-6).
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=1e-6)


def test_needs_an_adapter(data, adapter_file, tmp_path):
    with pytest.raises(TrainConfigError, match="cls_text: the CLS text fusion trains with an adapter"):
        loop.train(config(data, tmp_path / "run", cls_text=True), models(adapter_file, False))


def test_phrase_missing_from_a_caption_is_named_before_training(adapter_file, tmp_path):
    import json
    folder = training_data.write_object_dataset(str(tmp_path / "data"), groups=1, refs=1)
    with open(folder) as f:
        manifest = json.load(f)
    manifest["samples"][0]["caption"] = "a picture of something"
    with open(folder, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match="is not in the prompt"):
        loop.train(config(folder, tmp_path / "run", cls_text=True), models(adapter_file))


def test_train_node_fusion_loads_in_the_loader_and_changes_the_conditioning(host, adapter_file,
                                                                           tmp_path, output_folder):
    """In inference mode, as the host runs nodes (the text encoder's weights are inference
    tensors): MultiRefTrain with cls_text writes the fusion, MultiRef CLS Fusion Loader reads it
    from models/multiref, MultiRef CLS Text Encode uses it."""
    from multiref.nodes.training import MultiRefTrain
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    models_dir = tmp_path / "models_multiref"
    models_dir.mkdir()
    host.folder_paths.add_model_folder_path("multiref", str(models_dir))
    inputs = {"dataset": data, "output_dir": "cls", "steps": 2, "batch_size": 1,
              "grad_accumulation": 1, "learning_rate": 0.05, "lora_rank": 4, "resolution": 64,
              "save_every": 2, "keep_last": 1, "seed": 1, "gradient_checkpointing": True,
              "resume": True}
    with torch.inference_mode():
        model, clip, vae = (tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15"),
                            tiny_models.tiny_vae())
        clip_vision, adapter = tiny_models.tiny_clip_vision(), load_adapter(adapter_file)
        MultiRefTrain().train(model, clip, vae, **inputs, adapter=adapter,
                              clip_vision=clip_vision, cls_text=True)
        os.replace(output_folder / "cls" / checkpoint.CLS_TEXT_NAME, models_dir / "fusion.safetensors")
        loader = host.nodes["MultiRefClsFusionLoader"]
        assert "fusion.safetensors" in loader.INPUT_TYPES()["required"]["fusion_name"][0]
        (fusion,) = loader().load("fusion.safetensors")
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
        (refs,) = host.nodes["MultiRefReference"]().make(image, "apple", 1.0, 0.0, 1.0)
        (encoded,) = host.nodes["MultiRefEncodeReferences"]().encode(refs, adapter, clip_vision,
                                                                     model, 0)
        (augmented,) = host.nodes["MultiRefClsTextEncode"]().encode(
            clip, "a photo of an apple", encoded, fusion, 0.0)
        (plain,) = host.nodes["CLIPTextEncode"]().encode(clip, "a photo of an apple")
    assert fusion.encoders["l"].mlp[3].weight.abs().sum() > 0
    assert (augmented[0][0] - plain[0][0]).abs().max() > 0
