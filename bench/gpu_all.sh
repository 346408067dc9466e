#!/usr/bin/env bash
# Every GPU benchmark still "not measured" in bench/RESULTS.md, in one run on a CUDA machine,
# each printing its cases side by side; the output goes to the terminal and to $1 (default
# bench/gpu_results.txt). From the pack's folder, with the venv of `bash .ci/setup.sh`; the
# Flux timings need a current ComfyUI (COMFYUI_PATH) only for the trainer's reference layout.
set -u
out="${1:-bench/gpu_results.txt}"
py=".venv/bin/python"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for bench in msa_attention routing_overhead guidance_saturation train_memory flux_attention; do
    echo "=== python -m bench.$bench"
    timeout 240 "$py" -m "bench.$bench" || echo "bench.$bench exited with $?"
  done
  if [ -n "${COMFYUI_PATH:-}" ]; then
    echo "=== python -m bench.reference_layout (SDXL-shaped, bf16)"
    timeout 120 "$py" -m bench.reference_layout || echo "bench.reference_layout exited with $?"
  fi
} 2>&1 | tee "$out"
