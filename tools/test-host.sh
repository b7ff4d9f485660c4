#!/usr/bin/env bash
# Run the host-level tests (everything that boots ComfyUI: nodes, workflows headless, over HTTP and in the
# frontend) against another ComfyUI source, a tarball or a folder, e.g.
#   bash tools/test-host.sh ../shared/hosts/comfyui-0.8.0.tar.gz [pytest args]
#   bash tools/test-host.sh ~/ComfyUI [pytest args]          # your own ComfyUI (copied, never modified)
# tools/setup.sh builds that host into .host/ComfyUI-<version> (its step 6) next to the embedded 0.3.75.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift
cd "$repo"
mkdir -p .host
Z2I_COMFYUI_SRC="$src" bash tools/setup.sh > .host/setup-second.log 2>&1 || { cat .host/setup-second.log >&2; exit 1; }
second="$(sed -n 's/.*second host: \([^ ]*\) .*/\1/p' .host/setup-second.log | tail -n 1)"
[ -d "$second" ] || { cat .host/setup-second.log >&2; echo "no second host built from $src" >&2; exit 1; }
ver="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$second/comfyui_version.py")"
echo "[z2i test-host] ComfyUI $ver at $second"
export Z2I_COMFYUI="$second"
export PYTHONPATH="$(cat "$second/.z2i-site"):$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -m "host or server or frontend" "$@"
