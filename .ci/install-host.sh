#!/usr/bin/env bash
# Installs the test host into the virtual environment given as $1 (created if missing):
# CPU torch 2.13.0, the installable ComfyUI (comfyui==0.0.1) without its heavy dependency
# list, and the modules it really imports. Every pip call is held to torch==2.13.0.
set -euo pipefail
VENV="$1"
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/venv.sh"
"${PIP[@]}" -c "$HERE/constraints.txt" -r "$HERE/host-requirements.txt"
# --no-deps: comfyui 0.0.1 declares ~50 packages (bitsandbytes, open-clip, fschat, ...) that the
# paths exercised here never import. torchvision 0.16.2 is the newest release whose pure-Python
# import works beside a CPU-only torch (later ones abort on their missing compiled ops); the host
# only imports it for its Stable Cascade modules. spandrel needs torchvision at install time only.
"${PIP[@]}" --no-deps comfyui==0.0.1 torchvision==0.16.2 spandrel==0.4.2
"$PY" -c "import torch, comfy.model_patcher, comfy.nodes.package; print('host ready: torch', torch.__version__)"
