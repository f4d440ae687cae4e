#!/usr/bin/env bash
# Issue 13's GPU measurement in one command (about 5 minutes on an H200): the trainer's checks
# that need a GPU, then `fastsae train` tokens/s against the bare step at the issue's shape
# (TopK d_in 768, d_sae 24576, k 32, batch 4096), bf16 and fp32, synthetic data made on the GPU
# and a 1M-row bf16 activation file.
#
#   bash benchmarks/gpu_train_speed.sh       # results in benchmarks/results/ (and $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_train_speed: torch sees no CUDA device" >&2; exit 2; }
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/fastsae_pip.log 2>&1; then
  echo "gpu_train_speed: pip install failed (see /tmp/fastsae_pip.log); using a source copy on PYTHONPATH"
  rm -rf /tmp/fastsae_src && mkdir -p /tmp/fastsae_src && cp -r fastsae /tmp/fastsae_src/ && cp -r kernels /tmp/fastsae_src/fastsae/kernels && cp -r csrc /tmp/fastsae_src/fastsae/csrc
  export PYTHONPATH=/tmp/fastsae_src${PYTHONPATH:+:$PYTHONPATH}
fi
gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print('-'.join(w for w in n.lower().replace('nvidia','').split() if w))")
stamp="$gpu-$(date +%F)"
res=benchmarks/results
mkdir -p "$res"
python3 -c "import torch, triton, fastsae; from fastsae.ops import dispatch; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'backend', dispatch.select(torch.device('cuda'))[0])"

echo "== trainer checks on the GPU (host syncs between log steps, bf16/fp16 quality, roll-back)"
timeout 200 python3 benchmarks/gpu_train_checks.py "$res/$stamp-train-checks.json"
checks_rc=$?

echo "== fastsae train vs the bare step, bf16 (the default on CUDA)"
timeout 240 python3 benchmarks/bench_train.py --device cuda --d-in 768 --d-sae 24576 --k 32 --batch 4096 \
  --steps 400 --bare-steps 50 --log-every 50 --rounds 3 --data synthetic file --file-rows 1048576 \
  --json "$res/$stamp-train-speed-bf16.json" 2>&1 | grep -v "^\(data\|sae\|done\|final\|checkpoint\|metrics\|mean max\):"
bf16_rc=${PIPESTATUS[0]}

echo "== the same in fp32 (the issue's 150k/220k tokens/s were fp32)"
timeout 120 python3 benchmarks/bench_train.py --device cuda --dtype float32 --d-in 768 --d-sae 24576 --k 32 --batch 4096 \
  --steps 300 --bare-steps 30 --log-every 50 --rounds 2 --data synthetic \
  --json "$res/$stamp-train-speed-fp32.json" 2>&1 | grep -v "^\(data\|sae\|done\|final\|checkpoint\|metrics\|mean max\):"
fp32_rc=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then cp "$res/$stamp"-train-* "$OUT"/ 2>/dev/null || true; fi
echo "gpu_train_speed: checks rc=$checks_rc, bf16 rc=$bf16_rc, fp32 rc=$fp32_rc; results in $res/$stamp-train-*"
[ $checks_rc -eq 0 ] && [ $bf16_rc -eq 0 ] && [ $fp32_rc -eq 0 ]
