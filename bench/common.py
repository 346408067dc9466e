"""What the benchmarks share: booting the host with the pack loaded the way ComfyUI loads it,
and the kernels alone for the parts that need no host.

Run the benchmarks from the pack's folder as modules: `python -m bench.<name>`.
"""
import importlib
import importlib.util
import os

from headless import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot_pack(comfyui_path=None):
    """Boot the installed host, or the ComfyUI checkout at `comfyui_path` (as run.py does);
    returns name -> the pack's module as the host loaded it, e.g. pack("nodes.tiny_models")."""
    host.boot(comfyui_path)
    return lambda name: importlib.import_module(f"{host.PACK_FOLDER_NAME}.{name}")


def load_kernel(name):
    """kernels/<name>.py on its own (the kernels import only torch): no host needed."""
    spec = importlib.util.spec_from_file_location(f"multiref_bench_{name}",
                                                  os.path.join(ROOT, "kernels", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
