"""The headless HTTP path users script against: a real ComfyUI server with the pack in its
custom_nodes, POST /prompt, poll /history, download the image through /view."""
import json
import os
import urllib.request

import pytest

from comfy_server import running_server
from headless import api_client, shipped


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as url:
        yield url


def test_post_prompt_poll_history_fetch_image(server, tmp_path):
    with open(shipped.api_path("demo_tiny")) as f:
        workflow = json.load(f)
    info = json.loads(urllib.request.urlopen(f"{server}/object_info/MultiRefTinyDemoModels").read())
    assert info["MultiRefTinyDemoModels"]["category"].startswith("MultiRef")
    prompt_id = api_client.submit(server, workflow)
    entry = api_client.wait(server, prompt_id, timeout=300)
    paths = api_client.download_images(server, entry, str(tmp_path / "images"))
    assert len(paths) == 2  # the demo's picture and its routing maps
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_invalid_prompt_is_rejected_by_the_server(server):
    with pytest.raises(api_client.ApiError) as err:
        api_client.submit(server, {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert "400" in str(err.value)
