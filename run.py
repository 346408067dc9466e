"""Headless runner: execute an API-format ComfyUI workflow in-process and write its images.

    python run.py                                   # the built-in tiny demo (random weights)
    python run.py WORKFLOW_api.json --output out/   # your workflow
    python run.py WORKFLOW_api.json --comfyui ~/ComfyUI --output out/

Without --comfyui it uses the installable ComfyUI package (`bash .ci/install-host.sh .venv`).
It prints progress, the MultiRef nodes that ran and every file written (paths on stdout); the
host's own messages go to comfyui_host.log in the output folder.
"""
import argparse
import json
import os
import sys
import time

from headless import host as host_mod, model_files, shipped

DEMO = shipped.api_path("demo_tiny")
MODEL_FOLDERS = ("checkpoints", "clip_vision", "multiref", "ipadapter", "loras", "vae", "clip",
                 "unet")
HOST_LOG = "comfyui_host.log"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("workflow", nargs="?", help="API-format workflow JSON (default: the tiny demo)")
    parser.add_argument("--output", default="demo_output", help="folder for the images (created)")
    parser.add_argument("--comfyui", help="path to a ComfyUI checkout to run in (default: the "
                        "installed comfyui package)")
    parser.add_argument("--models", help="a models folder laid out like ComfyUI's models/ "
                        "(checkpoints/, clip_vision/, multiref/, ...)")
    parser.add_argument("--input", help="folder of the pictures the workflow loads (Load Image); "
                        "default: the checkout's input/, or an empty temporary folder")
    args = parser.parse_args(argv)
    path = args.workflow or DEMO
    try:
        with open(path) as f:
            prompt = json.load(f)
        host_mod.check_api_format(prompt)
    except FileNotFoundError:
        return _fail(f"workflow file not found: {path}")
    except json.JSONDecodeError as exc:
        return _fail(f"{path} is not valid JSON ({exc}); export the workflow with 'Export (API)'")
    except host_mod.HostError as exc:
        return _fail(str(exc))
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    log_path = os.path.join(output, HOST_LOG)
    print(f"booting ComfyUI ({args.comfyui or 'installed comfyui package'}); its own messages go "
          f"to {log_path}", file=sys.stderr, flush=True)
    with host_mod.host_output_to(log_path) as (out, err):
        try:
            host = host_mod.boot(comfyui_path=args.comfyui, output_dir=output)
            return _run(host, prompt, path == DEMO, output, args, out, err)
        except host_mod.HostError as exc:
            return _fail(str(exc), err)


def _run(host, prompt, is_demo, output, args, out, err):
    host.folder_paths.set_output_directory(output)  # also when the host was booted before
    if args.models:
        for folder in MODEL_FOLDERS:
            host.folder_paths.add_model_folder_path(folder, os.path.join(args.models, folder))
    if args.input:
        host.folder_paths.set_input_directory(os.path.abspath(args.input))
    # Every missing file at once, before the host loads (or tries to download) anything.
    missing = host.missing_files(prompt)
    if missing:
        return _fail(f"{len(missing)} file(s) this workflow needs are not installed, nothing was "
                     "run:\n" + "".join(f"  {m.line(_place(m, host, args))}\n" for m in missing) +
                     f"what to download: {model_files.README_SECTION}; or pass --models DIR "
                     "(a folder laid out like ComfyUI's models/)", err)
    if is_demo:
        print("running the built-in demo workflow: tiny models with RANDOM weights; the image "
              "shows the pipeline works, not what trained models draw", file=err)
    progress = host_mod.ProgressPrinter(
        stream=err, labels={str(i): node["class_type"] for i, node in prompt.items()})
    before = _files_in(output)
    started = time.time()
    host.execute(prompt, progress)  # checks the graph first: a broken one runs nothing
    written = sorted(p for p, stamp in _files_in(output).items()
                     if before.get(p) != stamp and os.path.basename(p) != HOST_LOG)
    ran = [(i, prompt[i]["class_type"]) for i in progress.executed_nodes() if i in prompt]
    ours = [(i, kind) for i, kind in ran if host.is_pack_node(kind)]
    print(f"done in {time.time() - started:.1f}s; {len(ran)} nodes ran, MultiRef nodes among "
          f"them: {len(ours)}", file=err)
    for node_id, kind in ours:
        print(f"  - {host.display_names.get(kind, kind)} (node {node_id})", file=err)
    print(f"files written: {len(written)}", file=err, flush=True)
    for file in written:
        print(file, file=out, flush=True)
    if not any(f.lower().endswith(IMAGE_SUFFIXES) for f in written):
        return _fail("the workflow ran but saved no image (add a SaveImage node)", err)
    return 0


def _place(missing, host, args):
    """Where the user should put a missing file: the --models/--input folder given, else the
    host's folder, unless that is the run's temporary folder (removed at exit)."""
    if missing.kind == "input":
        return os.path.abspath(args.input) if args.input else (
            "a folder of yours, passed as --input DIR" if _temporary(missing.folders[0], host)
            else None)
    if args.models:
        return os.path.join(os.path.abspath(args.models), missing.kind)
    if _temporary(missing.folders[0], host):
        return f"DIR/{missing.kind}/ of a models folder of yours, passed as --models DIR"
    return None


def _temporary(folder, host):
    return bool(host.scratch) and folder.startswith(host.scratch + os.sep)


def _files_in(folder):
    """{path: (size, mtime)} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            found[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _fail(message, stream=None):
    print(f"error: {message}", file=stream or sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
