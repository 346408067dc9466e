"""The command line: `torchrun --nproc_per_node 2 -m training` (DDP, gloo, 2 CPU processes, run
from the pack's folder as a user would) equals one in-process run with the same global batch;
bad input exits with every problem listed before any step."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from multiref.families import tiny_models
from multiref.training import cli, loop
from multiref.training.config import TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
import training_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"model": {"tiny": "sd15"}, "steps": 3, "batch_size": 2, "learning_rate": 0.002,
            "lora_rank": 4, "resolution": 64, "save_every": 3, "seed": 3}


def test_ddp_two_processes_equal_one_process(tmp_path):
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=2, refs=1)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(SETTINGS, dataset="data/manifest.json", output_dir="ddp")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "training", "--config", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = loop.train(TrainConfig(**dict(SETTINGS, dataset=data, output_dir=str(tmp_path / "one"))),
                            loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(),
                                        tiny_models.tiny_text_encoder("sd15"), "sd15"))
    finally:
        torch.set_num_threads(threads)
    ddp = load_file(str(tmp_path / "ddp" / "multiref_lora.safetensors"))
    one = load_file(single.weights)
    assert ddp.keys() == one.keys() and len(one) > 0
    moved = 0
    for key in one:
        # Gradients averaged over 2 processes vs. one batch of 2: equal up to float rounding.
        # Adam divides each gradient by its own scale, so where a gradient is near zero the
        # rounding shows in the update: tolerance = 1% of the most Adam can move a weight in
        # these steps (lr x steps); a wrong batch split or a missing all-reduce moves weights
        # by the whole amount.
        torch.testing.assert_close(ddp[key], one[key], rtol=0,
                                   atol=0.01 * SETTINGS["learning_rate"] * SETTINGS["steps"])
        moved += int(key.endswith("up.weight") and one[key].abs().sum() > 0)
    assert moved > 0  # the runs really trained
    ddp_losses = json.loads((tmp_path / "ddp" / "loss.json").read_text())
    assert [round(l, 5) for _, l in ddp_losses] == [round(l, 5) for _, l in single.losses]


def test_cli_reports_a_broken_dataset_and_exits(tmp_path, caplog):
    training_data.write_object_dataset(str(tmp_path), groups=2, refs=1)
    os.remove(tmp_path / "g0_v1.png")
    os.remove(tmp_path / "g1_v1_mask.png")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(SETTINGS, dataset="manifest.json", output_dir="run")))
    assert cli.main(["--config", str(cfg)]) == 2
    assert "2 problem(s)" in caplog.text and "g0_v1.png" in caplog.text and "g1_v1_mask.png" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_rejects_unknown_settings(tmp_path, caplog):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"dataset": "x.json", "output_dir": "run", "stpes": 3}))
    assert cli.main(["--config", str(cfg)]) == 2
    assert "unknown training setting(s) ['stpes']" in caplog.text


@pytest.mark.parametrize("bad", ["{not json", "[]"])
def test_cli_rejects_unreadable_config(tmp_path, caplog, bad):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(bad)
    assert cli.main(["--config", str(cfg)]) == 2
