"""Training the feature fusion (training/fusion.py) on the host's tiny models: it starts at the
adapter's own tokens, its experts and router change while the image projection stays frozen,
the saved adapter holds it in the pack's format, and a resumed run ends where a straight one
does."""
import os
import sys

import pytest
import torch

import tiny_checkpoints
from multiref.families import tiny_models
from multiref.kernels import checkpoints, feature_fusion
from multiref.training import checkpoint, config as config_mod, loop
from multiref.training.config import TrainConfig, TrainConfigError

sys.path.insert(0, os.path.dirname(__file__))
import training_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(one_reference_dataset):
    return one_reference_dataset


@pytest.fixture(scope="module")
def plus_path(tmp_path_factory):
    path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path_factory.mktemp("adapter")),
                                                "ip_adapter_plus", "sd15", file_format="safetensors")
    return path


def models(adapter):
    return loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(),
                       tiny_models.tiny_text_encoder("sd15"), "sd15",
                       tiny_models.tiny_clip_vision(), adapter)


def config(data, out, **kw):
    settings = dict(dataset=data, output_dir=str(out), steps=4, batch_size=1, learning_rate=1e-2,
                    lora_rank=4, resolution=64, save_every=2, keep_last=2, seed=3,
                    train_fusion=True)
    settings.update(kw)
    return TrainConfig(**settings)


def test_the_first_step_sees_the_adapters_own_tokens(data, plus_path, tmp_path):
    adapter = checkpoints.load_adapter(plus_path)
    fused = loop.Run(config(data, tmp_path / "a"), models(adapter), torch.device("cpu"),
                     loop.encoding.encode(config(data, tmp_path / "a"), models(adapter),
                                          loop.manifest.load(data)))
    plain = loop.Run(config(data, tmp_path / "b", train_fusion=False), models(adapter),
                     torch.device("cpu"), loop.encoding.encode(
                         config(data, tmp_path / "b", train_fusion=False), models(adapter),
                         loop.manifest.load(data)))
    assert fused.fusion.layers == feature_fusion.fusion_layers(3)
    for micro in range(4):
        a, b = fused.batch(micro, [0]), plain.batch(micro, [0])
        assert b["ref_hidden"] is None and a["ref_hidden"].shape[2] == 3
        tokens = loop.fusion.fused_tokens(fused.fusion, a["ref_tokens"], a["ref_hidden"])
        assert (tokens - b["ref_tokens"]).abs().max() < 1e-6
        assert (a["ref_tokens"] - b["ref_tokens"]).abs().max() < 1e-6  # same projection tokens
    # Same draws, same tokens: the same first loss (the fusion adds exactly zero).
    with torch.no_grad():
        loop._load(fused.patcher, torch.device("cpu"))
        loop._load(plain.patcher, torch.device("cpu"))
        try:
            assert abs(float(fused.step_module(fused.batch(0, [0])))
                       - float(plain.step_module(plain.batch(0, [0])))) < 1e-6
        finally:
            loop._unload(fused.patcher)
            loop._unload(plain.patcher)


def test_fusion_trains_saves_and_resumes(data, plus_path, tmp_path):
    adapter = checkpoints.load_adapter(plus_path)
    original = {k: v.clone() for k, v in adapter.state_dict().items()}
    straight = loop.train(config(data, tmp_path / "straight"), models(adapter))
    assert adapter.fusion is None and all(torch.equal(v, original[k])
                                          for k, v in adapter.state_dict().items())
    saved = checkpoints.load_adapter(straight.adapter_file)
    assert saved.fusion is not None and saved.fusion.layers == (0, 1, 2)
    tensors = saved.state_dict()
    for level in feature_fusion.LEVELS:  # every expert moved away from zero output
        assert tensors[f"fusion.experts.{level}.norm_out.weight"].abs().max() > 0
    assert not torch.equal(tensors["fusion.router.weight"], torch.zeros_like(tensors["fusion.router.weight"]))
    for k in original:
        if k.startswith("image_proj."):  # frozen
            assert torch.equal(tensors[k], original[k]), k
    for k, v in straight.fusion.state_dict_flat().items():
        assert torch.equal(tensors[k], v.detach()), k
    step_file = os.path.join(str(tmp_path / "straight"), "checkpoints", "step-000004",
                             checkpoint.ADAPTER_NAME)
    assert checkpoints.load_adapter(step_file).fingerprint == saved.fingerprint

    run = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(data, run, save_every=100), models(adapter),
                   check_interrupt=training_data.interrupt_at(3))
    assert checkpoint.saved_steps(str(run)) == [3]
    resumed = loop.train(config(data, run), models(adapter))
    assert resumed.steps == 4
    mine, other = straight.fusion.state_dict_flat(), resumed.fusion.state_dict_flat()
    for k in mine:  # same draws, same optimizer state: equal to float rounding
        torch.testing.assert_close(mine[k].detach(), other[k].detach(), rtol=0, atol=1e-6)
    # A run with fusion cannot resume as one without (and the reverse): the identity differs.
    with pytest.raises(TrainConfigError, match="train_fusion: True in the saved run, False now"):
        loop.train(config(data, run, steps=5, train_fusion=False), models(adapter))


def test_fusion_off_leaves_the_identity_as_before(data, tmp_path):
    off = config_mod.run_identity(config(data, tmp_path, train_fusion=False), "sd15", None)
    assert "train_fusion" not in off
    assert config_mod.run_identity(config(data, tmp_path), "sd15", None)["train_fusion"] is True


def test_fusion_needs_a_plus_adapter(data, tmp_path):
    base_path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter", "sd15")
    with pytest.raises(TrainConfigError, match="image_embeds"):
        loop.train(config(data, tmp_path / "run"), models(checkpoints.load_adapter(base_path)))
    with pytest.raises(TrainConfigError, match="train_fusion needs an adapter"):
        loop.train(config(data, tmp_path / "run"), models(None))
    with pytest.raises(TrainConfigError, match="train_fusion must be"):
        config_mod.validate(config(data, tmp_path / "run", train_fusion="yes"))


def test_a_fused_adapter_keeps_or_continues_its_fusion(data, tmp_path):
    """Trained without train_fusion, a fused adapter's fusion is kept as it was (its tokens, with
    the router's weights, are what the IP layers train on); with it, training starts from it."""
    path, tensors = tiny_checkpoints.write_fusion_checkpoint(str(tmp_path), "sd15", "fused.safetensors")
    adapter = checkpoints.load_adapter(path)
    kept = loop.train(config(data, tmp_path / "kept", steps=2, train_fusion=False), models(adapter))
    assert kept.fusion is None
    saved = checkpoints.load_adapter(kept.adapter_file).state_dict()
    fusion_keys = [k for k in tensors if k.startswith("fusion.")]
    assert all(torch.equal(saved[k], tensors[k]) for k in fusion_keys)
    run = loop.Run(config(data, tmp_path / "continued"), models(adapter), torch.device("cpu"),
                   loop.encoding.encode(config(data, tmp_path / "continued"), models(adapter),
                                        loop.manifest.load(data)))
    start = run.fusion.state_dict_flat()
    assert all(torch.equal(start[k].detach(), tensors[k].to(start[k].dtype)) for k in fusion_keys)
