"""The headless HTTP path users script against: a real ComfyUI server with the pack in its
custom_nodes, POST /prompt, poll /history, download the image through /view."""
import json
import os
import urllib.error
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


def test_missing_adapter_file_is_named_with_its_folders_in_the_400_reply(server):
    """What a script (and the editor's error dialog) gets for an adapter that is not installed."""
    with open(shipped.api_path("two_subjects_routing")) as f:
        workflow = json.load(f)
    node_id = next(i for i, n in workflow.items() if n["class_type"] == "MultiRefAdapterLoader")
    workflow[node_id]["inputs"]["adapter_name"] = "not_installed_adapter.bin"
    request = urllib.request.Request(f"{server}/prompt", json.dumps({"prompt": workflow}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400
    errors = json.loads(err.value.read())["node_errors"][node_id]["errors"]
    assert [e["type"] for e in errors] == ["custom_validation_failed"]
    details = errors[0]["details"]
    assert details.startswith("adapter_name - file 'not_installed_adapter.bin' not found. Searched: ")
    assert "models/multiref" in details and "hqhQAQ/MIP-Adapter" in details
