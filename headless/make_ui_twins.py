"""Regenerate the UI-format twin (example_workflows/NAME.json) of every api_workflows/*_api.json (run after editing one). The API
file is rewritten too, in the form the editor's 'Export (API)' gives for the twin (every widget
value present, defaults filled in), so both files stay the same graph. From the pack's folder:

    .venv/bin/python -m headless.make_ui_twins [NAME ...]

With names, only those workflows. The Flux workflows need a current ComfyUI's nodes: boot one
with COMFYUI_PATH=/path/to/ComfyUI (and its Python); the installable host skips them, saying so.
"""
import json
import os
import sys

from headless import host, shipped, workflow_format


def _write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(names=()):
    booted = host.boot(comfyui_path=os.environ.get("COMFYUI_PATH"))
    nodes = booted.nodes
    for api_path in shipped.api_files():
        name = shipped.name_of(api_path)
        if names and name not in names:
            continue
        reason = shipped.needs_current_host(name)
        if reason and booted.kind == "installable comfyui":
            print(f"skipped: {reason}")
            continue
        ui_path = shipped.ui_path(name)
        ui = workflow_format.api_to_ui(workflow_format.load(api_path), nodes)
        _write(ui_path, ui)
        _write(api_path, workflow_format.ui_to_api(ui, nodes))
        print(ui_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
