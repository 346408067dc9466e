"""The headless HTTP path users script against: a real ComfyUI server with the pack in its
custom_nodes, POST /prompt, poll /history, download the image through /view."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import HOST, ROOT, headless_host

spec = importlib.util.spec_from_file_location("api_client", os.path.join(ROOT, "headless", "api_client.py"))
api_client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api_client)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("server")
    server_cmd = shutil.which("comfyui", path=os.path.dirname(sys.executable))
    if HOST.kind != "installable comfyui" or server_cmd is None:
        pytest.skip("the HTTP test starts the installable host's server (`comfyui` command)")
    (tmp_path / "custom_nodes").mkdir()
    os.symlink(ROOT, tmp_path / "custom_nodes" / headless_host.PACK_FOLDER_NAME)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([server_cmd, "--cpu", "--cwd", str(tmp_path), "--listen", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/object_info/MultiRefTinyDemoModels", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("server did not come up: " + (tmp_path / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_post_prompt_poll_history_fetch_image(server, tmp_path):
    with open(os.path.join(ROOT, "workflows", "demo_tiny_api.json")) as f:
        workflow = json.load(f)
    info = json.loads(urllib.request.urlopen(f"{server}/object_info/MultiRefTinyDemoModels").read())
    assert info["MultiRefTinyDemoModels"]["category"].startswith("MultiRef")
    prompt_id = api_client.submit(server, workflow)
    entry = api_client.wait(server, prompt_id, timeout=300)
    paths = api_client.download_images(server, entry, str(tmp_path / "images"))
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_invalid_prompt_is_rejected_by_the_server(server):
    with pytest.raises(api_client.ApiError) as err:
        api_client.submit(server, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert "400" in str(err.value)
