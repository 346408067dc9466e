"""Test session set-up: boot one ComfyUI host for the whole session and load the pack through
the host's own custom-node loader.

Host: the installable ComfyUI (comfyui==0.0.1) by default; a ComfyUI checkout when
MULTIREF_TEST_HOST=checkout and COMFYUI_PATH points at it (see tests/test_current_host.py).
After the boot, the pack is importable as `multiref` (the same module objects the host loaded).
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only until the boot: headless.host.boot() takes the pack's folder off sys.path again (the
# `headless` and `bench` packages stay importable: their submodules are found through the
# packages themselves).
sys.path.insert(0, ROOT)
import bench  # noqa: E402,F401
from headless import host as headless_host  # noqa: E402

_checkout = os.environ.get("COMFYUI_PATH") if os.environ.get("MULTIREF_TEST_HOST") == "checkout" else None
HOST = headless_host.boot(comfyui_path=_checkout)
_PACK = headless_host.PACK_FOLDER_NAME
if _PACK not in sys.modules:
    raise RuntimeError(f"the host did not load the pack; host: {HOST}")


class _PackAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import multiref.x.y` gives the very module object the host loaded as
    `<pack folder>.x.y` (importing it there first if needed), so tests never hold a second copy."""

    def find_spec(self, name, path=None, target=None):
        if name == "multiref" or name.startswith("multiref."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_PACK + spec.name[len("multiref"):])

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _PackAlias())


class _PackRootIsAPlainFolder:
    """pytest (8+) makes every folder with an `__init__.py` on the way from the rootdir to the
    tests a Package and imports that `__init__.py` before the first test. The pack's root
    `__init__.py` is ComfyUI's entry point and imports its submodules relatively, so it only
    imports as a package named after its folder: under a name that is no identifier
    ("ComfyUI-MultiRef", "Multi Ref") pytest imports it as a top-level `__init__` and every
    test errors; under an identifier it imports a second copy of the pack and puts the folder
    above it on sys.path. Collecting the root as a plain folder means pytest never imports it:
    the host loads the pack, by its folder, as ComfyUI does. A registered plugin (not this
    conftest's own hook, which pytest consults only for folders below tests/) sees the root."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.samefile(path, ROOT):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_PackRootIsAPlainFolder(), "multiref-pack-root")


def pytest_report_header(config):
    return f"ComfyUI host: {HOST.kind} {HOST.version}"


@pytest.fixture(scope="session")
def host():
    return HOST


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared CPU: one thread is many times faster than several."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def output_folder(host, tmp_path):
    """The host's output folder moved to a fresh folder of this test (the training node writes
    only inside the output folder), restored afterwards."""
    saved = host.folder_paths.get_output_directory()
    folder = tmp_path / "output"
    folder.mkdir()
    host.folder_paths.set_output_directory(str(folder))
    yield folder
    host.folder_paths.set_output_directory(saved)


@pytest.fixture(scope="session")
def one_reference_dataset(tmp_path_factory):
    """A tiny training dataset of 2 groups with 1 reference each (tests/training_data.py)."""
    import training_data
    return training_data.write_object_dataset(str(tmp_path_factory.mktemp("data")), groups=2,
                                              refs=1)
