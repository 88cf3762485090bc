#!/usr/bin/env bash
# The GPU checks of the GPU-executor issue, as one prepared run on a lent GPU machine:
# the CUDA-vs-CPU tests, then benchmarks/gpu.py at full size. Logs go to $OUT (the device
# tool's folder that comes back) or /tmp/gpu-check.
#
#   bash benchmarks/gpu-check.sh              # on the GPU machine, from the repository root
#   SHRINK=16 bash benchmarks/gpu-check.sh    # a quick rehearsal (here too: the CUDA rows skip)
#
# The machine's image has torch, safetensors, networkx, xxhash, rich and numpy; packages it lacks
# (sd-mecha for the peer rows, tomlkit) travel as wheels in .whl/ (see docs/benchmarks.md).
# Budget: the tests take about a minute, the benchmark a few; the limits below leave room to
# rerun within the device time a task gets.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
SHRINK=${SHRINK:-1}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc; free -g | head -2; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
timeout 420 $PY benchmarks/gpu.py --shrink "$SHRINK" --data /tmp/mergebuild-bench --json "$OUT/gpu-bench.json" 2>&1 \
    | tee "$OUT/gpu-bench.log"
