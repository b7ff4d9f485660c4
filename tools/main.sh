#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a shipped workflow, headless, on the embedded tiny SD1.5
# checkpoint, writing its images to out/main (or the folder given as the first argument).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash tools/setup.sh
out="${1:-out/main}"
export PYTHONPATH="$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m z2i.run workflows/z2i_ddim_img2img.json --checkpoint z2i-tiny-sd15.safetensors \
  --output-dir "$out" --quiet
