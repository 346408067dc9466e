"""Submit an API-format workflow to a running ComfyUI server and fetch its images.

    python headless/api_client.py WORKFLOW_api.json --server http://127.0.0.1:8188 --output out/

Standard library only: POST /prompt, poll GET /history/{prompt_id}, download GET /view.
"""
import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


class ApiError(RuntimeError):
    pass


def _request(url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ApiError(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:2000]}") from exc


def submit(server, workflow):
    """POST /prompt; returns the prompt id. Validation errors come back as HTTP 400."""
    body = {"prompt": workflow, "client_id": str(uuid.uuid4())}
    return json.loads(_request(f"{server}/prompt", body))["prompt_id"]


def wait(server, prompt_id, timeout=600, poll=0.5):
    """Poll /history until the prompt is done; returns its history entry."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = json.loads(_request(f"{server}/history/{prompt_id}"))
        entry = history.get(prompt_id)
        if entry:
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                raise ApiError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages'))[:2000]}")
            return entry
        time.sleep(poll)
    raise ApiError(f"prompt {prompt_id} did not finish within {timeout}s")


def download_images(server, entry, output):
    os.makedirs(output, exist_ok=True)
    paths = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            query = urllib.parse.urlencode({"filename": image["filename"],
                                            "subfolder": image.get("subfolder", ""),
                                            "type": image.get("type", "output")})
            path = os.path.join(output, image["filename"])
            with open(path + ".part", "wb") as f:
                f.write(_request(f"{server}/view?{query}"))
            os.replace(path + ".part", path)
            paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("workflow")
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--output", default="api_output")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    with open(args.workflow) as f:
        workflow = json.load(f)
    try:
        prompt_id = submit(args.server, workflow)
        print(f"queued {prompt_id}", file=sys.stderr)
        for path in download_images(args.server, wait(args.server, prompt_id, args.timeout), args.output):
            print(path)
    except (ApiError, urllib.error.URLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
