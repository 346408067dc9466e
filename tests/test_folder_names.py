"""The README's test command works whatever the folder the pack was cloned into is called:
the install section's `ComfyUI-MultiRef` (a hyphen) and a name with a space, neither of which
is a Python identifier."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def _copy_of_the_checkout(target):
    """The files a clone of this working tree has (tracked and new, not the ignored ones)."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"needs a git checkout of the pack: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):  # a deleted but still tracked file is not in a clone
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))


@pytest.mark.parametrize("folder", ["ComfyUI-MultiRef", "Multi Ref"])
def test_pytest_collects_everything_and_runs_in_a_folder_named(tmp_path, folder):
    clone = tmp_path / folder
    _copy_of_the_checkout(clone)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MULTIREF_TEST_HOST", "COMFYUI_PATH", "PYTEST_ADDOPTS")}
    # The whole suite is collected (testpaths); one small file runs, with the session host.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "test_guidance_kernel"],
                            cwd=clone, capture_output=True, text=True, timeout=300, env=env)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-3000:]
    assert " passed, " in report and "deselected" in report, report[-2000:]
    assert "error" not in report.lower(), report[-3000:]
