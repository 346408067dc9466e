"""What a registry user and a reader of the README expect: the license file matches the
metadata, the registry name follows the registry's rules, the README's node names are the
editor's, its host claims match requires-comfyui, and the command-line tools leave nothing
in the temp folder."""
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import HOST, ROOT


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _version(text):
    return tuple(int(part) for part in text.split("."))


def test_license_file_is_the_apache_license_the_metadata_names():
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = " ".join(f.read().split())
    assert text.startswith("Apache License Version 2.0, January 2004 http://www.apache.org/licenses/")
    for section in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS"):
        assert section in text


def test_registry_name_follows_the_registry_rules():
    """docs.comfy.org/registry/specifications: under 100 characters, letters, digits, '-', '_'
    and '.', no two special characters in a row, starts with a letter; best practice: no
    'ComfyUI' in it."""
    name = _pyproject()["project"]["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()


def test_readme_node_table_uses_the_editor_display_names():
    import multiref
    rows = dict((node_id, name) for name, node_id in
                re.findall(r"^\| \*\*(.+?)\*\* `(\w+)` \|", _readme(), re.M))
    assert rows == multiref.NODE_DISPLAY_NAME_MAPPINGS


def test_requires_comfyui_matches_the_readme_and_the_tested_hosts():
    declared = _pyproject()["tool"]["comfy"]["requires-comfyui"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", declared)
    readme = _readme()
    assert re.search(rf"declares\s+`{re.escape(declared)}`", readme)
    minimum = _version(declared[2:])
    tested = re.search(r"Tested: the June 2024 packaging \(`comfyui==([\d.]+)`\) and ComfyUI ([\d.]+)",
                       " ".join(readme.split()))
    assert tested, "the README's sentence naming the tested hosts changed"
    assert all(_version(v) >= minimum for v in tested.groups())
    if HOST.version != "unknown":  # the host this session runs on must satisfy it too
        assert _version(HOST.version) >= minimum


def test_trainer_cli_leaves_nothing_in_the_temp_folder(tmp_path):
    """The CLI boots a host (a work folder, the inductor cache) and exits on a bad config."""
    temp = tmp_path / "temp"
    temp.mkdir()
    config = tmp_path / "config.json"
    config.write_text('{"dataset": "x.json", "output_dir": "run", "stpes": 3}')
    host = ["--comfyui", os.environ["COMFYUI_PATH"]] if HOST.kind == "ComfyUI checkout" else []
    result = subprocess.run([sys.executable, "-m", "training", "--config", str(config), *host],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TMPDIR=str(temp)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "stpes" in result.stderr
    assert os.listdir(temp) == []
