#!/usr/bin/env bash
# The one-command GPU suite, for a machine with one NVIDIA GPU and no network (torch, triton,
# numpy, safetensors, ninja and pytest preinstalled; pytest-xdist used when present):
#
#   bash benchmarks/gpu_suite.sh            # logs and results in benchmarks/results/ (and $OUT when set)
#
# Runs in about 4 minutes on an H200 (budget: 5). Each phase has its own time limit, so a hung or
# slow phase cannot eat the others' time, and every phase writes as it goes:
#   build   the C++/CUDA extension, in the background while the tests start (~16 s, MAX_JOBS=16)
#   aot     the Triton AOT report for sm_90, in the background (CPU only)
#   probe   whether C++ errors reach Python or crash the process (benchmarks/probe_cuda_errors.py)
#   tests   the whole suite; each failure is logged the moment it happens (FASTSAE_TEST_FAILURE_LOG),
#           so the summary below is printed even when the phase is cut short
#   bench   `fastsae bench --device cuda`, and the ReLU sparse-vs-dense sweep
# The speed targets have their own commands, each under 5 minutes too (run after this one):
#   python3 benchmarks/gpu_targets.py          (issue 12: encoder, backward, step, Adam, contenders)
#   bash benchmarks/gpu_train_speed.sh         (issue 13: `fastsae train` tokens/s against the bare step)
# Files: benchmarks/results/<gpu>-<date>-{tests.log,failures.txt,build.log,aot.json,probe.json}, .json, .md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_suite t+$(elapsed)s] $*"; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_suite: torch sees no CUDA device" >&2; exit 2; }

# The source as installed (kernels/ inside the package as fastsae.kernels, csrc/ as fastsae.csrc),
# without pip: the GPU image has no network to fetch a build backend with.
SRC=/tmp/fastsae_src
rm -rf "$SRC" && mkdir -p "$SRC" && cp -r fastsae "$SRC"/ && cp -r kernels "$SRC"/fastsae/kernels && cp -r csrc "$SRC"/fastsae/csrc
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
export FASTSAE_BUILD_DIR=${FASTSAE_BUILD_DIR:-/tmp/fastsae_build} MAX_JOBS=${MAX_JOBS:-16}
FASTSAE="python3 -m fastsae.cli"

gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('-'.join(w for w in n.lower().replace('nvidia','').split() if w))")
res=benchmarks/results
stamp="$res/$gpu-$(date +%F)"
mkdir -p "$res"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true

say "build: the C++/CUDA extension, in the background"
( timeout 240 python3 -c "
import time; t = time.time()
from fastsae.ops import backend_cpp
print('HAS_CUDA_KERNELS', backend_cpp.HAS_CUDA_KERNELS, 'error', backend_cpp.CUDA_BUILD_ERROR, 'seconds', round(time.time() - t, 1))
" > "$stamp-build.log" 2>&1 ) &
build_pid=$!
say "aot: Triton sm_90 report, in the background"
( env -u TRITON_INTERPRET timeout 200 $FASTSAE aot --arch sm_90 --json "$stamp-aot.json" > "$stamp-aot.log" 2>&1 ) &
aot_pid=$!

wait $build_pid; say "build: $(tail -1 "$stamp-build.log")"
say "probe: C++ errors from torch and from the extension, each in a fresh process (background)"
( timeout 120 python3 benchmarks/probe_cuda_errors.py --json "$stamp-probe.json" > "$stamp-probe.log" 2>&1 ) &
probe_pid=$!

say "tests"
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
: > "$stamp-failures.txt"
FASTSAE_TEST_FAILURE_LOG="$PWD/$stamp-failures.txt" timeout --signal=INT --kill-after=15 190 \
  python3 -m pytest -q -p no:randomly "${workers[@]}" -rfE tests 2>&1 | tee "$stamp-tests.log"
tests_rc=${PIPESTATUS[0]}
say "tests: rc=$tests_rc (124: cut short at the time limit); $(grep -c . "$stamp-failures.txt") failures:"
cat "$stamp-failures.txt"

say "bench: fastsae bench --device cuda"
timeout 60 $FASTSAE bench --device cuda --json "$stamp.json"
bench_rc=$?
[ $bench_rc -eq 0 ] && python3 benchmarks/update_readme.py --table "$stamp.json" > "$stamp.md"
say "bench: ReLU row-wise sparse path vs dense path"
timeout 30 python3 benchmarks/bench_sparse_path.py --device cuda --rows 4096 --d-sae 24576 --l0 32 128 512 2048 \
  --json "$stamp-sparse-path.json" || true

wait $probe_pid; say "probe:"; cat "$stamp-probe.log"
wait $aot_pid; say "aot: $(tail -1 "$stamp-aot.log")"
# The device tool brings back at most 8 files: the two to read first, and everything in one archive.
if [ -n "${OUT:-}" ]; then
  cp "$stamp-failures.txt" "$stamp-tests.log" "$OUT"/ 2>/dev/null
  tar czf "$OUT/gpu_suite-results.tgz" "$stamp"* 2>/dev/null || true
fi
say "done: tests rc=$tests_rc, bench rc=$bench_rc; results in $stamp*"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
