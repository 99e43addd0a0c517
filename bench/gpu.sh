#!/usr/bin/env bash
# Every benchmark at the paper's sizes in ONE command, for one H100 / H200 with JAX (CUDA),
# flax, optax, orbax, torch and transformers installed (nothing is installed here; grain,
# tensorflow-datasets and rouge-score are not needed). Prints one table per bench; meant to fit
# in about 5 minutes. Each bench has its own time limit, and a failed or timed-out bench is
# reported and skipped, so that one call always prints what the others measured.
#
#   bash bench/gpu.sh            # from the repository root
#   LEVERS=1 bash bench/gpu.sh   # and then bench/levers.py: each speed lever alone (~3 min more)
set -uo pipefail
cd "$(dirname "$0")/.."
# unbuffered: a bench stopped by its time limit still shows the rows it finished
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
run() {  # run LIMIT_SECONDS COMMAND...: the command, or a line saying why it gave nothing
  local limit=$1; shift
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ]; then echo "!! timed out after ${limit} s: $*"; elif [ $rc -ne 0 ]; then
    echo "!! failed (exit $rc): $*"; fi
}
python -c "import jax; print('devices:', jax.devices())"
echo "== bench/loss.py: fused vs unfused head + loss (CSD, FKL), official PyTorch CSD =="
run 75 python bench/loss.py --sizes paper --repeats 10
echo "== bench/models.py: forward throughput =="
run 60 python bench/models.py --sizes paper --repeats 5
echo "== bench/step.py: full distillation step, csd-jax vs PyTorch (eager, torch.compile) =="
run 170 python bench/step.py --sizes paper --repeats 5 --torch-compile
if [ "${LEVERS:-0}" = 1 ]; then
  echo "== bench/levers.py: one lever at a time against the trainer's defaults =="
  run 200 python bench/levers.py --repeats 5
fi
