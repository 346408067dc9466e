"""Train from a config file, from the pack's folder:

    python -m training --config my_run.json [--comfyui ~/ComfyUI]
    torchrun --nproc_per_node 2 -m training --config my_run.json     # DDP over 2 GPUs

It boots a ComfyUI host the way run.py does (headless/host.py, which also takes the pack's
folder off sys.path: its `nodes` package would shadow ComfyUI's top-level `nodes` module) and runs
the trainer from the pack as the host loaded it.
"""
import argparse
import importlib
import sys

from headless import host as host_module


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--comfyui")
    known, _ = early.parse_known_args(argv)
    try:
        host_module.boot(comfyui_path=known.comfyui)
    except host_module.HostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cli = importlib.import_module(f"{host_module.PACK_FOLDER_NAME}.training.cli")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
