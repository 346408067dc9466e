"""The current-ComfyUI tier: the host-facing tests again, against a ComfyUI checkout.

Users run a current ComfyUI (a git checkout), the rest of the suite runs on the installable
package. With COMFYUI_PATH pointing at a checkout (and COMFYUI_PYTHON at the Python of its
environment, default: this one), the tests in HOST_TESTS run in a subprocess whose session
host is that checkout (tests/conftest.py boots it when MULTIREF_TEST_HOST=checkout), and the
headless runner runs its demo there. Without COMFYUI_PATH they skip and say why (-rs).
`bash .ci/install-checkout-deps.sh VENV` installs what a checkout needs into a separate venv.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import HOST, ROOT
from test_runner import assert_demo_ran

# Test files that exercise the host; extend it when a test file depends on host behaviour.
HOST_TESTS = ("tests/test_loading.py", "tests/test_patch_identity.py", "tests/test_runner.py",
              "tests/test_workflows.py", "tests/test_patching.py", "tests/test_adapters.py",
              "tests/test_references.py", "tests/test_routing_nodes.py", "tests/test_msa_node.py",
              "tests/test_guidance_sampling.py", "tests/test_training.py",
              "tests/test_training_node.py", "tests/test_packaging.py",
              "tests/test_reliability.py", "tests/test_adapter_files.py",
              "tests/test_unified_loader.py", "tests/test_reference_files.py",
              "tests/test_reference_options.py", "tests/test_layer_weights.py",
              "tests/test_dit_models.py", "tests/test_dit_guidance.py",
              "tests/test_dit_positions.py", "tests/test_techniques.py", "tests/test_flux_msa.py",
              "tests/test_knobs.py", "tests/test_run_state.py",
              "tests/test_flux_routing.py", "tests/test_context_windows.py",
              "tests/test_attention_masks.py", "tests/test_cls_text.py",
              "tests/test_feature_fusion.py",
              # the checkout's own server and editor (skips, saying why, without its front end)
              "tests/test_editor.py")
# test_runner's demo test is the same run as test_runner_demo_writes_a_png_on_the_checkout
# below: it runs once.
HOST_TESTS_DESELECTED = ("tests/test_runner.py::test_demo_workflow_writes_a_png",)

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
SKIP_REASON = ("current-ComfyUI tier not run: COMFYUI_PATH is not set (set COMFYUI_PATH to a "
               "ComfyUI checkout and COMFYUI_PYTHON to a Python that can import it, e.g. one "
               "made by `bash .ci/install-checkout-deps.sh VENV`)")


def _checkout():
    if HOST.kind != "installable comfyui":
        pytest.skip("this session already runs on the checkout (the tier's own subprocess)")
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "nodes.py")):
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no nodes.py)")
    return os.path.abspath(COMFYUI_PATH)


def _run(args, timeout, **env):
    return subprocess.run([COMFYUI_PYTHON, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **env))


def test_host_tests_pass_on_the_checkout():
    path = _checkout()
    deselect = [arg for test in HOST_TESTS_DESELECTED for arg in ("--deselect", test)]
    result = _run(["-m", "pytest", *HOST_TESTS, *deselect], timeout=900,
                  MULTIREF_TEST_HOST="checkout", COMFYUI_PATH=path,
                  COLUMNS="400")  # skip reasons in full: pytest cuts lines to the width
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    # The session really ran on the checkout, and ran tests (not only skips).
    assert "ComfyUI host: ComfyUI checkout" in report, report[-2000:]
    passed = re.search(r"(\d+) passed", report)
    assert passed and int(passed.group(1)) > 0, report[-2000:]
    assert not re.search(r"\d+ (failed|error)", report), report[-4000:]
    # With the checkout's front end installed, its editor tests ran (only opt-in ones skip).
    has_front_end = _run(["-c", "import comfyui_frontend_package"], timeout=60).returncode == 0
    editor_skips = [line for line in report.splitlines() if line.startswith("SKIPPED")
                    and "test_editor.py" in line and "MULTIREF_WRITE_THUMBNAILS" not in line
                    and "2024 editor" not in line]
    assert not (has_front_end and editor_skips), editor_skips


def test_runner_demo_writes_a_png_on_the_checkout(tmp_path):
    path = _checkout()
    result = _run([os.path.join(ROOT, "run.py"), "--comfyui", path, "--output", str(tmp_path)],
                  timeout=600)
    assert_demo_ran(result, tmp_path)


def test_runner_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    """Runs on every machine: a wrong --comfyui is a one-line error naming the folder."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--comfyui",
                             str(tmp_path), "--output", str(tmp_path / "out")], cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and not line.startswith("booting")]
    assert len(lines) == 1, result.stderr
    assert str(tmp_path) in lines[0] and "not a ComfyUI checkout" in lines[0]


def test_runner_refuses_a_checkout_hidden_by_the_installed_package(tmp_path):
    """A checkout's comfy/ is a namespace package: beside the installable host's `comfy` it
    cannot be imported; the runner says to use the checkout's own Python."""
    if HOST.kind != "installable comfyui":
        pytest.skip("needs the installable host's Python")
    checkout = tmp_path / "ComfyUI"
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "nodes.py").write_text("")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--comfyui",
                             str(checkout), "--output", str(tmp_path / "out")], cwd="/",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "\n" not in errors[0], result.stderr
    assert "installable comfyui package" in errors[0] and "own environment" in errors[0]
