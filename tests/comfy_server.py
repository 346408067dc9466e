"""Start the session host's real web server with the pack in its custom_nodes, for tests that
talk to it over HTTP or load its editor page: the installable host's `comfyui` command, or a
checkout's main.py (whose editor is the comfyui-frontend-package it pins)."""
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import HOST, ROOT, headless_host


def _server_command(workdir):
    """The command that serves `workdir` (models/, input/, custom_nodes/ ...), without the
    address; skips the test when this host cannot serve."""
    if HOST.kind == "installable comfyui":
        server_cmd = shutil.which("comfyui", path=os.path.dirname(sys.executable))
        if server_cmd is None:
            pytest.skip("starting a server needs the installable host's `comfyui` command")
        return [server_cmd, "--cpu", "--cwd", str(workdir)]
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        pytest.skip("the checkout's web editor is the comfyui-frontend-package its "
                    "requirements.txt pins; install it (.ci/checkout-requirements.txt has it)")
    main = os.path.join(os.environ["COMFYUI_PATH"], "main.py")
    return [sys.executable, main, "--cpu", "--base-directory", str(workdir)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(workdir, ready_timeout=120):
    """Yield the server's base URL once the pack's nodes are listed in /object_info."""
    command = _server_command(workdir)
    (workdir / "custom_nodes").mkdir()
    os.symlink(ROOT, workdir / "custom_nodes" / headless_host.PACK_FOLDER_NAME)
    port = _free_port()
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*command, "--listen", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + ready_timeout
            while True:
                try:
                    urllib.request.urlopen(f"{url}/object_info/MultiRefTinyDemoModels", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        pytest.fail("server did not come up: " + log_path.read_text()[-3000:])
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
