"""Regenerate the UI-format twin of every workflows/*_api.json (run after editing one):

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


def main():
    host = _load("host").boot()
    fmt = _load("workflow_format")
    for api_path in sorted(glob.glob(os.path.join(WORKFLOWS, "*_api.json"))):
        ui = fmt.api_to_ui(fmt.load(api_path), host.nodes)
        target = ui_twin_path(api_path)
        with open(target + ".tmp", "w") as f:
            json.dump(ui, f, indent=1)
            f.write("\n")
        os.replace(target + ".tmp", target)
        print(target)
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    sys.exit(main())
