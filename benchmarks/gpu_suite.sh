#!/usr/bin/env bash
# The one-command GPU suite: the test suite on CUDA, then the benchmarks, on a machine with one
# NVIDIA GPU and no network (torch, triton, numpy, safetensors, ninja and pytest preinstalled).
#
#   bash benchmarks/gpu_suite.sh            # results in benchmarks/results/ (and $OUT when set)
#
# Writes benchmarks/results/<gpu>-<date>.json (+ .md table, tests log, the ReLU sparse-vs-dense
# sweep and the Triton AOT report).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_suite: torch sees no CUDA device" >&2; exit 2; }

# Install without network; if pip cannot (no setuptools there), import from a copy laid out as
# installed (kernels/ inside the package as fastsae.kernels).
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/fastsae_pip.log 2>&1; then
  echo "gpu_suite: pip install failed (see /tmp/fastsae_pip.log); using a source copy on PYTHONPATH"
  rm -rf /tmp/fastsae_src && mkdir -p /tmp/fastsae_src && cp -r fastsae /tmp/fastsae_src/ && cp -r kernels /tmp/fastsae_src/fastsae/kernels && cp -r csrc /tmp/fastsae_src/fastsae/csrc
  export PYTHONPATH=/tmp/fastsae_src${PYTHONPATH:+:$PYTHONPATH}
fi
FASTSAE="python3 -m fastsae.cli"

gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('-'.join(w for w in n.lower().replace('nvidia','').split() if w))")
stamp="$gpu-$(date +%F)"
res=benchmarks/results
mkdir -p "$res"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true

echo "== tests on CUDA"
python3 -m pytest -q --maxfail=25 tests 2>&1 | tee "$res/$stamp-tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
$FASTSAE bench --device cuda --json "$res/$stamp.json"
bench_rc=$?
[ $bench_rc -eq 0 ] && python3 benchmarks/update_readme.py --table "$res/$stamp.json" > "$res/$stamp.md"

echo "== ReLU: row-wise sparse path vs dense path"
python3 benchmarks/bench_sparse_path.py --device cuda --rows 4096 --d-sae 24576 --l0 32 128 512 2048 \
  --json "$res/$stamp-sparse-path.json" || true

if $FASTSAE --help 2>/dev/null | grep -q " aot"; then
  echo "== Triton AOT report (sm_90)"
  $FASTSAE aot --arch sm_90 --json "$res/$stamp-aot.json" || true
fi

if [ -n "${OUT:-}" ]; then cp "$res/$stamp"* "$OUT"/ 2>/dev/null || true; fi
echo "gpu_suite: tests rc=$tests_rc, bench rc=$bench_rc; results in $res/$stamp.*"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
