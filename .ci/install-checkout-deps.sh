#!/usr/bin/env bash
# Makes a virtual environment ($1, created if missing) in which a current ComfyUI checkout
# boots headless on CPU, for the current-ComfyUI test tier:
#   bash .ci/install-checkout-deps.sh /path/to/venv [/path/to/ComfyUI]
#   COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python .venv/bin/python -m pytest -q
# Every pip call is held to CPU torch 2.13.0 by .ci/constraints.txt.
set -euo pipefail
VENV="$1"
CHECKOUT="${2:-${COMFYUI_PATH:-}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/venv.sh"
"${PIP[@]}" -c "$HERE/constraints.txt" -r "$HERE/checkout-requirements.txt"
# The checkout imports torchvision when comfy.sd loads; 0.16.2 is the newest whose pure-Python
# import works beside a CPU-only torch 2.13 (later wheels abort on missing compiled ops).
# spandrel (upscale-model nodes) declares torchvision, hence --no-deps for both.
"${PIP[@]}" -c "$HERE/constraints.txt" --no-deps torchvision==0.16.2 spandrel==0.4.2
if [ -n "$CHECKOUT" ]; then
  (cd "$CHECKOUT" && "$PY" -W ignore -c "import sys; sys.argv = ['check', '--cpu']
import comfy.options; comfy.options.enable_args_parsing()
import utils, nodes, execution, comfyui_version
print('checkout ready: ComfyUI', comfyui_version.__version__)")
fi
echo "checkout venv ready: $PY"
