#!/usr/bin/env bash
# Every benchmark at the paper's sizes in ONE command, for one H100 / H200 with JAX (CUDA),
# flax, optax, orbax, torch and transformers installed (nothing is installed here; grain,
# tensorflow-datasets and rouge-score are not needed). Prints one table per bench; meant to fit
# in about 5 minutes.
#
#   bash bench/gpu.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
python -c "import jax; print('devices:', jax.devices())"
echo "== bench/loss.py: fused vs unfused head + loss (CSD, FKL), official PyTorch CSD =="
python bench/loss.py --sizes paper --repeats 10
echo "== bench/models.py: forward throughput =="
python bench/models.py --sizes paper --repeats 5
echo "== bench/step.py: full distillation step, csd-jax vs PyTorch (eager, torch.compile) =="
python bench/step.py --sizes paper --repeats 5 --torch-compile
