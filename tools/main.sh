#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the shipped pix2pix-zero workflow (workflows/z2i_pix2pix_zero.json),
# headless through the pack's runner, on the toy-world model trained here (docs/TOY_MODEL.md), turning a red
# circle into a red square (only the guidance step changed for this model: 0.001, the shipped 0.1 is SD1.5's); writes
# the edit, the source and before_after.png to out/main (or the folder given as
# the first argument) and says what the rule-based judge sees in each.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash tools/setup.sh
out="${1:-out/main}"
export PYTHONPATH="$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python tools/toy_world/main_job.py "$out"
