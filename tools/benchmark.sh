#!/usr/bin/env bash
# Set up (idempotent), then run the benchmark with the given arguments, e.g.
#   bash tools/benchmark.sh --steps 10 --sizes 64,128 --repeats 3 --write BENCHMARKS.md
# The diffusers peer (on unless --no-peer) installs tools/requirements-bench.txt once into the benchmark's own
# cache folder (~/.cache/z2i/bench-<hash>), never into the test venv. Nothing is downloaded from a model hub.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
Z2I_MODELS="${Z2I_MODELS:-sd15,sdxl}" bash tools/setup.sh
export PYTHONPATH="$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python tools/benchmark.py "$@"
