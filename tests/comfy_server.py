"""Start the installable host's real web server (`comfyui` command) with the pack in its
custom_nodes, for tests that talk to it over HTTP or load its editor page."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import HOST, ROOT, headless_host


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(workdir, ready_timeout=120):
    """Yield the server's base URL once the pack's nodes are listed in /object_info.
    Skips the test when the session's host is not the installable one (it has no server)."""
    server_cmd = shutil.which("comfyui", path=os.path.dirname(sys.executable))
    if HOST.kind != "installable comfyui" or server_cmd is None:
        pytest.skip("starting a server needs the installable host's `comfyui` command")
    (workdir / "custom_nodes").mkdir()
    os.symlink(ROOT, workdir / "custom_nodes" / headless_host.PACK_FOLDER_NAME)
    port = _free_port()
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([server_cmd, "--cpu", "--cwd", str(workdir), "--listen",
                                 "127.0.0.1", "--port", str(port)],
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
