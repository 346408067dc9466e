"""Headless runner: execute an API-format ComfyUI workflow in-process and write its images.

    python run.py                                   # the built-in tiny demo (random weights)
    python run.py WORKFLOW_api.json --output out/   # your workflow
    python run.py WORKFLOW_api.json --comfyui ~/ComfyUI --output out/

Without --comfyui it uses the installable ComfyUI package (`bash .ci/install-host.sh .venv`).
"""
import argparse
import json
import os
import sys
import time

from headless import host as host_mod, shipped

DEMO = shipped.api_path("demo_tiny")
MODEL_FOLDERS = ("checkpoints", "clip_vision", "multiref", "ipadapter", "loras", "vae", "clip")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("workflow", nargs="?", help="API-format workflow JSON (default: the tiny demo)")
    parser.add_argument("--output", default="demo_output", help="folder for the images (created)")
    parser.add_argument("--comfyui", help="path to a ComfyUI checkout to run in (default: the "
                        "installed comfyui package)")
    parser.add_argument("--models", help="a models folder laid out like ComfyUI's models/ "
                        "(checkpoints/, clip_vision/, multiref/, ...)")
    args = parser.parse_args(argv)
    path = args.workflow or DEMO
    try:
        with open(path) as f:
            prompt = json.load(f)
    except FileNotFoundError:
        return _fail(f"workflow file not found: {path}")
    except json.JSONDecodeError as exc:
        return _fail(f"{path} is not valid JSON ({exc}); export the workflow with 'Export (API)'")
    try:
        host_mod.check_api_format(prompt)
        output = os.path.abspath(args.output)
        os.makedirs(output, exist_ok=True)
        print(f"booting ComfyUI ({args.comfyui or 'installed comfyui package'}) ...", file=sys.stderr)
        host = host_mod.boot(comfyui_path=args.comfyui, output_dir=output)
        if args.models:
            for folder in MODEL_FOLDERS:
                host.folder_paths.add_model_folder_path(folder, os.path.join(args.models, folder))
        if path == DEMO:
            print("running the built-in demo workflow: tiny models with RANDOM weights; the image "
                  "shows the pipeline works, not what trained models draw", file=sys.stderr)
        started = time.time()
        outputs = host.execute(prompt, host_mod.ProgressPrinter())
    except host_mod.HostError as exc:
        return _fail(str(exc))
    images = [os.path.join(output, img.get("subfolder", ""), img["filename"])
              for ui in outputs.values() for img in (ui or {}).get("images", [])
              if img.get("type", "output") == "output"]
    for image in images:
        print(image)
    print(f"done in {time.time() - started:.1f}s: {len(images)} image(s) in {output}", file=sys.stderr)
    return 0 if images else _fail("the workflow ran but saved no image (add a SaveImage node)")


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
