"""Regenerate the UI-format twin of every workflows/*_api.json (run after editing one). The API
file is rewritten too, in the form the editor's 'Export (API)' gives for the twin (every widget
value present, defaults filled in), so both files stay the same graph:

    .venv/bin/python headless/make_ui_twins.py
"""
import glob
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOWS = os.path.join(os.path.dirname(HERE), "workflows")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"multiref_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ui_twin_path(api_path):
    return api_path[: -len("_api.json")] + ".json"


def _write(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main():
    host = _load("host").boot()
    fmt = _load("workflow_format")
    for api_path in sorted(glob.glob(os.path.join(WORKFLOWS, "*_api.json"))):
        ui = fmt.api_to_ui(fmt.load(api_path), host.nodes)
        _write(ui_twin_path(api_path), ui)
        _write(api_path, fmt.ui_to_api(ui, host.nodes))
        print(ui_twin_path(api_path))
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.exit(main())
