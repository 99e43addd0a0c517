#!/usr/bin/env bash
# Every benchmark at the paper's sizes in ONE command, for one H100 / H200 with JAX (CUDA),
# flax, optax, orbax, torch and transformers installed (nothing is installed here; grain,
# tensorflow-datasets and rouge-score are not needed). Prints one table per bench; meant to fit
# in about 8 minutes. Each bench has its own time limit, and a failed or timed-out bench is
# reported and skipped, so that one call always prints what the others measured.
#
#   bash bench/gpu.sh            # from the repository root
#   LEVERS=1 bash bench/gpu.sh   # and then bench/levers.py: each speed lever alone (~3 min more)
#   MEMORY=1 bash bench/gpu.sh   # and the compiled step's memory on the GPU, fused vs unfused
#                                # (compile only, every paper pair twice: ~10 min more)
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
run 70 python bench/loss.py --sizes paper --repeats 10
echo "== bench/models.py: forward throughput (GPT-2-XL, Gemma-7B, Qwen2.5-7B/1.5B, Gemma-2-9B/2B) =="
run 60 python bench/models.py --sizes paper --repeats 3
echo "== bench/step.py: full distillation step, csd-jax vs PyTorch (eager, torch.compile) =="
run 130 python bench/step.py --sizes paper --repeats 5 --torch-compile \
  --only "gpt2-xl->gpt2,gpt2-xl->gpt2-medium,gemma-7b->gemma-2b"
# csd-jax alone: PyTorch beside a 9B teacher would share the GPU with JAX's memory pool
echo "== bench/step.py: Qwen2.5-7B -> 1.5B (4 x 1024), Gemma-2-9B -> 2B (2 x 1024), csd-jax =="
run 60 python bench/step.py --sizes paper --repeats 3 --no-torch \
  --only "qwen2.5-7b->1.5b,gemma-2-9b->2b"
# generating chat pairs (csd-jax generate): decoding's tokens/s against the same model's forward
echo "== bench/generate.py: KV-cache sampling vs the batched forward (Qwen2.5-1.5B / 7B shapes) =="
run 180 python bench/generate.py --sizes paper --repeats 3 --greedy
if [ "${LEVERS:-0}" = 1 ]; then
  echo "== bench/levers.py: one lever at a time against the trainer's defaults =="
  run 200 python bench/levers.py --repeats 5
fi
if [ "${MEMORY:-0}" = 1 ]; then
  echo "== bench/step.py --memory-only: XLA's memory of the compiled step, fused vs unfused =="
  run 600 python bench/step.py --memory-only
fi
