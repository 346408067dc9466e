"""Train from a config file, from the pack's folder:

    python -m training --config my_run.json [--comfyui ~/ComfyUI]
    torchrun --nproc_per_node 2 -m training --config my_run.json     # DDP over 2 GPUs

The pack's folder holds a `nodes` package and ComfyUI a top-level `nodes` module, so this entry
takes the pack's folder off sys.path, boots a ComfyUI host the way run.py does (headless/host.py)
and runs the trainer from the pack as the host loaded it.
"""
import argparse
import importlib
import importlib.util
import os
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--comfyui")
    known, _ = early.parse_known_args(argv)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != PACK_ROOT]
    spec = importlib.util.spec_from_file_location("multiref_headless_host",
                                                  os.path.join(PACK_ROOT, "headless", "host.py"))
    host_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_module)
    try:
        host_module.boot(comfyui_path=known.comfyui)
    except host_module.HostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cli = importlib.import_module(f"{host_module.PACK_FOLDER_NAME}.training.cli")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
