"""Regenerate the UI-format twin of every workflows/*_api.json (run after editing one). The API
file is rewritten too, in the form the editor's 'Export (API)' gives for the twin (every widget
value present, defaults filled in), so both files stay the same graph. From the pack's folder:

    .venv/bin/python -m headless.make_ui_twins
"""
import glob
import json
import os
import sys

from headless import host, workflow_format

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


def ui_twin_path(api_path):
    return api_path[: -len("_api.json")] + ".json"


def _write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main():
    nodes = host.boot().nodes
    for api_path in sorted(glob.glob(os.path.join(WORKFLOWS, "*_api.json"))):
        ui = workflow_format.api_to_ui(workflow_format.load(api_path), nodes)
        _write(ui_twin_path(api_path), ui)
        _write(api_path, workflow_format.ui_to_api(ui, nodes))
        print(ui_twin_path(api_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
