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


def assert_demo_wrote_one_png(result, folder):
    """The runner's demo succeeded, said its weights are random and printed the PNG it wrote."""
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = [p for p in os.listdir(folder) if p.endswith(".png")]
    assert len(pngs) == 1
    with open(folder / pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "RANDOM weights" in result.stderr
    assert str(folder / pngs[0]) in result.stdout


def test_demo_workflow_writes_a_png(tmp_path):
    assert_demo_wrote_one_png(_run("--output", str(tmp_path)), tmp_path)


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
