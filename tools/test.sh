#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest and run on the default host only.
# Without arguments (what CI runs: .ci/run):
#   1. the whole suite on the embedded ComfyUI 0.3.75;
#   2. the host-level tests (everything that boots ComfyUI: nodes, workflows headless, over HTTP and in the
#      frontend) on upstream ComfyUI 0.8.0 when ../shared/hosts/comfyui-0.8.0.tar.gz exists (or the tarball/folder
#      in $Z2I_SECOND_HOST), built by tools/setup.sh into .host/ComfyUI-0.8.0 with its own pinned frontend;
# then one line per host with its counts. Tests marked `numeric` (each image of a batch edited exactly as alone,
# the diffusers parity) run on the first host only: they compare Z2I's own row-wise arithmetic and torch's, which
# no host changes (~12 minutes of the second run saved, to keep CI under 45 minutes on 2 cores).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash tools/setup.sh
export PYTHONPATH="$repo/.host/pythonpath${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

summary() { grep -E "(passed|failed|error).* in [0-9.]+s" "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'; }
logs="$repo/.host/test-logs"
mkdir -p "$logs"
rc=0
.venv/bin/python -m pytest 2>&1 | tee "$logs/host-0.3.75.log" || rc=$?
lines=("host ComfyUI 0.3.75 (whole suite): $(summary "$logs/host-0.3.75.log")")

# the shared folder beside the repository (../shared), or the workplace's /work/shared for a clone made elsewhere
second="${Z2I_SECOND_HOST:-}"
if [ -z "$second" ]; then
  for cand in "$repo/../shared/hosts/comfyui-0.8.0.tar.gz" /work/shared/hosts/comfyui-0.8.0.tar.gz; do
    if [ -e "$cand" ]; then second="$cand"; break; fi
  done
  second="${second:-$repo/../shared/hosts/comfyui-0.8.0.tar.gz}"
fi
if [ -e "$second" ]; then
  rc2=0
  bash tools/test-host.sh "$second" -m "(host or server or frontend) and not numeric and not slow and not once" 2>&1 \
    | tee "$logs/host-second.log" || rc2=$?
  ver="$(sed -n 's/^\[z2i test-host\] ComfyUI \([^ ]*\) at .*/\1/p' "$logs/host-second.log" | tail -n 1)"
  lines+=("host ComfyUI ${ver:-?} (host-level tests): $(summary "$logs/host-second.log")")
  [ "$rc2" -eq 0 ] || rc=$rc2
else
  lines+=("second host: $second not found, skipped")
fi
printf '\n'
printf '%s\n' "${lines[@]}"
exit "$rc"
