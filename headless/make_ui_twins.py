"""Regenerate the UI-format twin (example_workflows/NAME.json) of every api_workflows/*_api.json (run after editing one). The API
file is rewritten too, in the form the editor's 'Export (API)' gives for the twin (every widget
value present, defaults filled in), so both files stay the same graph. From the pack's folder:

    .venv/bin/python -m headless.make_ui_twins
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


def main():
    nodes = host.boot().nodes
    for api_path in shipped.api_files():
        ui_path = shipped.ui_path(shipped.name_of(api_path))
        ui = workflow_format.api_to_ui(workflow_format.load(api_path), nodes)
        _write(ui_path, ui)
        _write(api_path, workflow_format.ui_to_api(ui, nodes))
        print(ui_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
