"""What every benchmark shares: booting the host with the pack loaded the way ComfyUI loads it.

Run the benchmarks from the pack's folder as modules: `python -m bench.<name>`.
"""
import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot_pack():
    """Boot the installed host (headless/host.py, as run.py does); returns name -> the pack's
    module as the host loaded it, e.g. pack("nodes.tiny_models")."""
    # The pack folder must not stay importable as top-level: its `nodes` package would shadow
    # ComfyUI's top-level `nodes` module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    spec = importlib.util.spec_from_file_location("multiref_headless_host",
                                                  os.path.join(ROOT, "headless", "host.py"))
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    host.boot()
    return lambda name: importlib.import_module(f"{host.PACK_FOLDER_NAME}.{name}")
