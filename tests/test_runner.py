"""The headless runner (the main job) and its one-line errors."""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import HOST, ROOT, headless_host
from headless import shipped

DEMO = shipped.api_path("demo_tiny")


def _run(*args, timeout=300, **env):
    """run.py in a process of its own, on the session's host."""
    host = ["--comfyui", os.environ["COMFYUI_PATH"]] if HOST.kind == "ComfyUI checkout" else []
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args, *host], cwd="/",
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **env))


# Every line run.py may write to stderr when a workflow runs: the host's own messages (import
# warnings and tracebacks, library warnings, its progress bars) go to the log file instead.
RUNNER_LINES = (r"booting ComfyUI \(.*\); its own messages go to .*comfyui_host\.log",
                r"running the built-in demo workflow: tiny models with RANDOM weights; .*",
                r"  running node \S+ \S+",
                r"(\s*\[[#.]{20}\] \d+/\d+)+",
                r"done in [\d.]+s; \d+ nodes ran, MultiRef nodes among them: \d+",
                r"  - .+ \(node \S+\)",
                r"files written: \d+")


def _pack_nodes_in(workflow_path):
    """'display name (node id)' of every node of the workflow file that this pack provides."""
    import multiref
    with open(workflow_path) as f:
        workflow = json.load(f)
    return sorted(f"{multiref.NODE_DISPLAY_NAME_MAPPINGS[node['class_type']]} (node {node_id})"
                  for node_id, node in workflow.items()
                  if node["class_type"] in multiref.NODE_CLASS_MAPPINGS)


def assert_demo_ran(result, folder):
    """The runner's demo succeeded, said its weights are random, kept the host's messages off
    the terminal, listed the MultiRef nodes of the demo file as run and printed the files it
    wrote, which exist (at least one PNG)."""
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    noise = [line for line in lines if not any(re.fullmatch(p, line) for p in RUNNER_LINES)]
    assert not noise, "\n".join(noise[:20])
    assert "RANDOM weights" in result.stderr
    listed = sorted(line[len("  - "):] for line in lines if line.startswith("  - "))
    assert listed == _pack_nodes_in(DEMO)
    written = result.stdout.split()
    assert f"files written: {len(written)}" in lines
    assert written and all(os.path.isfile(p) and os.path.dirname(p) == str(folder) for p in written)
    pngs = sorted(str(folder / p) for p in os.listdir(folder) if p.endswith(".png"))
    assert pngs and sorted(p for p in written if p.endswith(".png")) == pngs
    # The demo's two SaveImage prefixes: the picture and its routing maps.
    assert [os.path.basename(p).rsplit("_", 2)[0] for p in pngs] == ["multiref_demo",
                                                                     "multiref_demo_routing"]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(folder / "comfyui_host.log") > 0  # the host's messages went there


def test_demo_workflow_writes_a_png(tmp_path):
    assert_demo_ran(_run("--output", str(tmp_path)), tmp_path)


def test_runner_leaves_nothing_in_the_temp_folder(tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    result = _run("--output", str(tmp_path / "out"), TMPDIR=str(temp))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(temp) == []


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
    prompt = {"1": {"class_type": "CheckpointLoaderSimple",
                    "inputs": {"ckpt_name": "my_sdxl_finetune.safetensors"}},
              "2": {"class_type": "EmptyLatentImage",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                          "filename_prefix": "missing"}}}
    with pytest.raises(headless_host.HostError) as err:
        host.execute(prompt)
    message = str(err.value)
    assert "my_sdxl_finetune.safetensors" in message and "models/checkpoints" in message
    assert "\n" not in message


def _runner():
    """run.py as a module of this process: it runs on the session's host (already booted)."""
    spec = importlib.util.spec_from_file_location("multiref_run", os.path.join(ROOT, "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_graph():
    """Tiny models -> text -> sampler -> decode -> save, core nodes around one of the pack's."""
    return {
        "1": {"class_type": "MultiRefTinyDemoModels", "inputs": {"family": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "seed": 0, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["3", 0]}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["5", 0]}},
    }


def _run_in_process(prompt, tmp_path, capfd, *options):
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(prompt))
    output = tmp_path / "out"
    folders = headless_host.boot().folder_paths
    session = folders.get_output_directory(), folders.get_input_directory()
    try:
        code = _runner().main([str(path), "--output", str(output), *options])
    finally:
        folders.set_output_directory(session[0])
        folders.set_input_directory(session[1])
    captured = capfd.readouterr()
    return code, captured, output


def _broken(change):
    prompt = _small_graph()
    change(prompt)
    return prompt


BROKEN_GRAPHS = {
    "link to a missing node": (
        lambda p: p["4"]["inputs"].update(model=["99", 0]),
        "node 4 (KSampler) input 'model': links to node 99, which is not in the workflow; link "
        "it to an output of a node that is"),
    "link to an output slot that does not exist": (
        lambda p: p["5"]["inputs"].update(vae=["1", 7]),
        "node 5 (VAEDecode) input 'vae': links to output 7 of node 1 (MultiRefTinyDemoModels), "
        "which has 4 output(s) (0 MODEL, 1 CLIP, 2 VAE, 3 CLIP_VISION); use one of those slots"),
    "wrong-typed link": (
        lambda p: p["5"]["inputs"].update(vae=["1", 1]),
        "node 5 (VAEDecode) input 'vae' takes VAE but is linked to output 1 of node 1 "
        "(MultiRefTinyDemoModels), which gives CLIP; link output 2 of node 1 "
        "(MultiRefTinyDemoModels), its VAE, instead"),
    "missing required input": (
        lambda p: p["4"]["inputs"].pop("model"),
        "node 4 (KSampler): required input 'model' is missing; link a MODEL output to it"),
    "missing required widget value": (
        lambda p: p["4"]["inputs"].pop("steps"),
        "node 4 (KSampler): required input 'steps' is missing; give it a value (INT)"),
    "unknown class_type": (
        lambda p: p["3"].update(class_type="NoSuchNodeAnywhere"),
        "workflow uses node types this ComfyUI does not have: NoSuchNodeAnywhere; install the "
        "custom node packs that provide them (MultiRef nodes come from this pack: check that "
        "it loaded without errors)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_GRAPHS))
def test_broken_graph_is_one_line_before_anything_runs(case, tmp_path, capfd):
    change, message = BROKEN_GRAPHS[case]
    code, captured, output = _run_in_process(_broken(change), tmp_path, capfd)
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"], captured.err
    assert "running node" not in captured.err and captured.out == ""
    assert os.listdir(output) == ["comfyui_host.log"]  # no image: nothing ran


def test_the_small_graph_itself_runs(tmp_path, capfd):
    """The graphs above fail only by their one change."""
    code, captured, output = _run_in_process(_small_graph(), tmp_path, capfd)
    assert code == 0, captured.err
    assert [p for p in os.listdir(output) if p.endswith(".png")]


def _graph_with_missing_files():
    prompt = _small_graph()
    prompt.update({
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "absent_sdxl.safetensors"}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "absent_vit_h.safetensors"}},
        "12": {"class_type": "MultiRefAdapterLoader", "inputs": {"adapter_name": "absent_adapter.bin"}},
        "13": {"class_type": "LoraLoader", "inputs": {
            "lora_name": "absent_lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0,
            "model": ["10", 0], "clip": ["10", 1]}},
        "14": {"class_type": "VAELoader", "inputs": {"vae_name": "absent_vae.safetensors"}},
        "15": {"class_type": "LoadImage", "inputs": {"image": "absent_picture.png"}},
        "16": {"class_type": "LoadImageMask", "inputs": {"image": "absent_mask.png", "channel": "red"}},
    })
    return prompt


def test_every_missing_file_is_listed_with_its_folder_before_anything_runs(tmp_path, capfd):
    models, pictures = tmp_path / "models", tmp_path / "pictures"
    pictures.mkdir()
    expected = [
        f"  absent_sdxl.safetensors (node 10 CheckpointLoaderSimple, ckpt_name): put it in {models}/checkpoints",
        f"  absent_vit_h.safetensors (node 11 CLIPVisionLoader, clip_name): put it in {models}/clip_vision",
        f"  absent_adapter.bin (node 12 MultiRefAdapterLoader, adapter_name): put it in {models}/multiref",
        f"  absent_lora.safetensors (node 13 LoraLoader, lora_name): put it in {models}/loras",
        f"  absent_vae.safetensors (node 14 VAELoader, vae_name): put it in {models}/vae",
        f"  absent_picture.png (node 15 LoadImage, image): put it in {pictures}",
        f"  absent_mask.png (node 16 LoadImageMask, image): put it in {pictures}",
    ]
    code, captured, output = _run_in_process(_graph_with_missing_files(), tmp_path, capfd,
                                             "--models", str(models), "--input", str(pictures))
    assert code == 2
    lines = captured.err.splitlines()
    first = lines.index("error: 7 file(s) this workflow needs are not installed, nothing was run:")
    assert lines[first + 1:first + 8] == expected
    assert "Model files" in lines[first + 8]
    assert "running node" not in captured.err
    assert os.listdir(output) == ["comfyui_host.log"]


def test_missing_files_are_not_sent_to_the_runs_temporary_folders(host, tmp_path, capfd):
    """Without --models/--input, a host folder inside the run's temporary work folder (removed at
    exit) is no place for a file: the line asks for the option instead."""
    code, captured, _ = _run_in_process(_graph_with_missing_files(), tmp_path, capfd)
    assert code == 2
    listed = [line for line in captured.err.splitlines() if "(node 1" in line]
    assert len(listed) == 7
    for line in listed:
        place = line.split(": put it in ", 1)[1]
        assert not (host.scratch and host.scratch in place), line
        if "models folder of yours" in place or "--input DIR" in place:
            assert host.scratch


def test_demo_runs_in_process_and_reports_progress(host):
    progress = headless_host.ProgressPrinter(quiet=True)
    outputs = host.execute(copy.deepcopy(_demo()), progress)
    assert any(ui.get("images") for ui in outputs.values())
    steps = [data for event, data in progress.events if event == "progress"]
    assert steps and steps[-1]["value"] == steps[-1]["max"] == 4


def test_a_workdir_kept_from_another_copy_of_the_pack_links_this_one(tmp_path):
    """A workdir (e.g. a benchmark's cache) whose pack link points at a moved or deleted copy:
    the link is replaced by one to this copy instead of failing to boot; a right link stays."""
    link = tmp_path / "custom_nodes" / headless_host.PACK_FOLDER_NAME
    link.parent.mkdir()
    os.symlink(tmp_path / "gone", link, target_is_directory=True)
    for _ in range(2):
        folder = headless_host._custom_nodes_dir(str(tmp_path))
        assert folder == str(link.parent)
        assert os.path.realpath(link) == os.path.realpath(headless_host.PACK_ROOT)
