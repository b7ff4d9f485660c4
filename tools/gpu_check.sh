#!/usr/bin/env bash
# The checks that need a CUDA GPU (issue 28), in under 8 minutes on one GPU with this repository:
#   1. the suite's GPU-relevant host tests on cuda (Z2I_DEVICE=cuda): the GPU path, pix2pix-zero, AGG (its CLIP
#      style loss), h-direction training, CSG, the inversion;
#   2. tools/gpu_check.py: fp16 vs fp32 guidance (gradient and edit difference, the loss scale used), batch 1 vs 4
#      for plain sampling and each method (UNet calls and time), peak VRAM per method at 512 px
#      (torch.cuda.max_memory_allocated) with the memory mode auto chose, and a summary table
#      (out/gpu_check/summary.md, also printed).
# Without a CUDA GPU it says so and exits 0. --dry-run prints this plan and exits 0 (the suite runs it).
# Usage: bash tools/gpu_check.sh [--dry-run] [output folder, default out/gpu_check]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-out/gpu_check}"
tests="tests/test_gpu_path.py tests/test_pix2pix_zero.py tests/test_agg_nodes.py tests/test_asyrp_train_nodes.py tests/test_csg_nodes.py tests/test_inversion_node.py"
plan() {
  echo "[gpu_check] plan:"
  echo "  setup:  Z2I_MODELS=sd15,sdxl bash tools/setup.sh"
  echo "  tests:  Z2I_DEVICE=cuda pytest -m 'not frontend and not server and not slow' $tests  (timeout 300 s)"
  echo "  probe:  Z2I_DEVICE=cuda python tools/gpu_check.py --out $out  (fp16 vs fp32, batch 1 vs 4, peak VRAM at 512 px; timeout 180 s)"
  echo "  output: $out/pytest.log, $out/summary.md"
}
if [ "$dry" = 1 ]; then plan; exit 0; fi
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
plan
Z2I_MODELS="${Z2I_MODELS:-sd15,sdxl}" bash tools/setup.sh
export PYTHONPATH="$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 Z2I_DEVICE=cuda
mkdir -p "$out"
rc=0
timeout 300 .venv/bin/python -m pytest -q -m 'not frontend and not server and not slow' $tests \
  -p no:cacheprovider >"$out/pytest.log" 2>&1 || rc=$?
tail -n 15 "$out/pytest.log"
timeout 180 .venv/bin/python tools/gpu_check.py --out "$out" || rc=$?
exit $rc
