#!/usr/bin/env bash
# Issue 18's GPU figures in one device run: ~8-9 minutes on an H100/H200, every step under its own timeout
# (timeouts 45 + 90 + 360 + 75 = 570 s, so one run fits the device tool's 600 s per-command limit).
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on the GPU machine
#
# Raw output goes to $OUT/gpu_logs/<date>-<gpu>/ when $OUT is set (the device tool brings $OUT back),
# else to benchmarks/gpu_logs/<date>-<gpu>/. Needs torch (CUDA) and timm; no ray, optuna or mlflow.
# A step that fails or times out leaves its partial log (paper_grid_cost prints one @@row JSON line
# per network as it finishes) and the next step still runs.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PYTHON:-python}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' \
      | sed 's/^NVIDIA-//; s/-*$//' | tr 'A-Z' 'a-z')
dir=${OUT:+$OUT/gpu_logs}
dir=${dir:-benchmarks/gpu_logs}/$(date -u +%F)-${gpu:-unknown}
mkdir -p "$dir"
echo "logs: $dir"

step() {  # step NAME TIMEOUT_S COMMAND...: run with a timeout, log stdout+stderr, record rc and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$dir/session.txt"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$dir/$name.txt" 2>&1
    echo "   rc=$? after $((SECONDS - t0)) s" | tee -a "$dir/session.txt"
}

{
    date -u
    nvidia-smi
    "$PY" -c "import sys, torch, timm; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__)"
    git log -1 --oneline 2>/dev/null || true
} >"$dir/env.txt" 2>&1

# 1. The real capture test (GraphedTrainStep / GraphedEval against eager), if pytest is on the image (~30 s).
if "$PY" -c "import pytest" 2>/dev/null; then
    step test_train_cuda 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -rs -k "graph or fused or cuda"
else
    echo "== test_train_cuda skipped: no pytest on this image" | tee -a "$dir/session.txt"
fi

# 2. Single small trials: target busy >= 60% and graphed >= 2x eager; trainer vs hand-written graph (~1 min).
step small_trials 90 "$PY" benchmarks/paper_grid_cost.py --models cifar_wrn:16:4@128,cifar_wrn:16:2@128 \
    --no-pack --json "$dir/small_trials.json"

# 3. The four paper networks at their recipes' batch sizes, auto packing, projected grid hours (~5-6 min).
step paper_grid 360 "$PY" benchmarks/paper_grid_cost.py --json "$dir/paper_grid.json"

# 4. torch.compile(mode="reduce-overhead") against the explicit graph, on the small model (compiles: ~1 min).
step reduce_overhead 75 "$PY" benchmarks/paper_grid_cost.py --models cifar_wrn:16:4@128 --no-pack \
    --reduce-overhead --json "$dir/reduce_overhead.json"

echo "done: $dir" | tee -a "$dir/session.txt"
