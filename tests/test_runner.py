"""The headless runner (the main job) and its one-line errors."""
import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, headless_host
from headless import shipped

DEMO = shipped.api_path("demo_tiny")


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def assert_demo_wrote_its_pngs(result, folder):
    """The runner's demo succeeded, said its weights are random and printed the two PNGs it
    wrote: the picture and its routing maps (the demo's two SaveImage prefixes)."""
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert [p.rsplit("_", 2)[0] for p in pngs] == ["multiref_demo", "multiref_demo_routing"]
    for png in pngs:
        with open(folder / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert str(folder / png) in result.stdout
    assert "RANDOM weights" in result.stderr


def test_demo_workflow_writes_a_png(tmp_path):
    assert_demo_wrote_its_pngs(_run("--output", str(tmp_path)), tmp_path)


def test_ui_format_file_is_refused_with_one_line(tmp_path):
    ui = {"last_node_id": 2, "last_link_id": 0, "nodes": [{"id": 1, "type": "KSampler"}],
          "links": [], "version": 0.4}
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui))
    result = _run(str(path), "--output", str(tmp_path))
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "UI-format" in lines[0] and "Export (API)" in lines[0]


def _demo():
    with open(DEMO) as f:
        return json.load(f)


def test_missing_node_class_names_it_and_the_fix(host):
    prompt = _demo()
    prompt["1"]["class_type"] = "SomeNodeNobodyInstalled"
    with pytest.raises(headless_host.HostError) as err:
        host.execute(prompt)
    message = str(err.value)
    assert "SomeNodeNobodyInstalled" in message and "install" in message and "\n" not in message


def test_missing_model_file_names_the_file_and_the_folder(host):
    prompt = _demo()
    prompt["1"] = {"class_type": "CheckpointLoaderSimple",
                   "inputs": {"ckpt_name": "my_sdxl_finetune.safetensors"}}
    with pytest.raises(headless_host.HostError) as err:
        host.execute(prompt)
    message = str(err.value)
    assert "my_sdxl_finetune.safetensors" in message and "models/checkpoints" in message
    assert "\n" not in message


def test_demo_runs_in_process_and_reports_progress(host):
    progress = headless_host.ProgressPrinter(quiet=True)
    outputs = host.execute(copy.deepcopy(_demo()), progress)
    assert any(ui.get("images") for ui in outputs.values())
    steps = [data for event, data in progress.events if event == "progress"]
    assert steps and steps[-1]["value"] == steps[-1]["max"] == 4
