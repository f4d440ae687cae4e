#!/usr/bin/env bash
# The Triton kernels must compile for sm_90 (H100/H200) with this environment's Triton (3.9, from
# constraints.txt) and with the GPU image's (3.6): what compiles on one may not on the other (the
# first GPU run found fp64 tl.dot rejected by 3.6 only). No GPU is needed: `fastsae aot` compiles
# every configuration the launchers pick, fp64 included, and fails on the first that does not.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_IMAGE_TRITON=3.6.0
out=${TMPDIR:-/tmp}/fastsae-aot
mkdir -p "$out"

echo "== fastsae aot, sm_90, Triton $(python3 -c 'import triton; print(triton.__version__)')"
env -u TRITON_INTERPRET python3 -m fastsae.cli aot --arch sm_90 --json "$out/aot-default.json" | tail -1

# A small second environment: this one's packages (torch, fastsae) plus Triton 3.6 in front.
venv="$out/triton-$GPU_IMAGE_TRITON"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "triton==$GPU_IMAGE_TRITON" 2>&1 | grep -v "^WARNING" || true
# fastsae itself, from this checkout (the outer environment's install may not be visible here).
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING" || true
echo "== fastsae aot, sm_90, Triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
env -u TRITON_INTERPRET "$venv/bin/python" -m fastsae.cli aot --arch sm_90 --json "$out/aot-$GPU_IMAGE_TRITON.json" | tail -1
