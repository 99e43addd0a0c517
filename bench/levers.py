"""The speed levers of the distillation step, one at a time, against the trainer's defaults.

    PYTHONPATH=. python bench/levers.py               # small shapes on CPU, GPT-2-XL -> GPT-2 on GPU

Every row changes ONE thing in csd-jax's jitted step (bench/step.py's `bench_jax`) and is
timed in the same process as the baseline: tokens/s, XLA's memory of the step, and both as
ratios to the baseline. The predictions below were written before any GPU run; the table is
what decides.

| lever | change | prediction (H100/H200, GPT-2-XL -> GPT-2, 8 x 512, bf16) |
|---|---|---|
| unfused loss | [N, V] float32 logits materialised | ~0.9x speed; +2 to 3 GB (4096 x 50257 x 4 B = 0.8 GB per copy, ~3 copies) |
| teacher float32 | the frozen teacher in float32, not bf16 | ~0.6x speed (its forward is ~80% of the FLOPs); +3 GB of weights |
| student remat full | recompute the student's layers in backward | ~0.95x speed; less activation memory |
| student remat dots | save only matmul outputs | ~0.98x speed; memory between none and full |
| cuDNN attention | `attention_impl=cudnn` (flash attention) | ~1.05x at 512 tokens (attention is a small share); GPU only |
| no donation | the state is not donated to the step | ~1.0x speed; + the student's state (~2 GB: params + Adam in float32) |
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.step import SIZES, bench_jax

LEVERS = {  # name: bench_jax options (the baseline has none)
    "baseline (the trainer's defaults)": {},
    "unfused loss": {"fused": False},
    "teacher float32": {"teacher_dtype": jnp.float32},
    "student remat full": {"remat": "full"},
    "student remat dots": {"remat": "dots"},
    "cuDNN attention": {"attention_impl": "cudnn"},
    "no donation": {"donate": False},
}
GPU_ONLY = ("cuDNN attention",)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default=None)
  parser.add_argument("--pair", default=None, help="a pair of bench/step.py (default: first)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  backend = jax.default_backend()
  sizes = args.sizes or ("small" if backend == "cpu" else "paper")
  pair = args.pair or next(iter(SIZES[sizes]))
  teacher_cfg, student_cfg, batch, seq = SIZES[sizes][pair]
  compute = jnp.float32 if backend == "cpu" else jnp.bfloat16
  print(f"bench/levers.py on {jax.devices()[0].device_kind} ({backend}): {pair}, {batch} x {seq},"
        f" compute {jnp.dtype(compute).name} (teacher too unless changed), median of "
        f"{args.repeats}")
  print(f"{'lever':<42}{'tok/s':>11}{'MB':>10}{'speed':>8}{'memory':>8}")
  base = None
  for name, options in LEVERS.items():
    if name in GPU_ONLY and backend != "gpu":
      print(f"{name:<42}{'(GPU only)':>11}")
      continue
    try:
      result = bench_jax(teacher_cfg, student_cfg, batch, seq, args.repeats, compute, **options)
    except Exception as error:  # noqa: BLE001 (one lever failing must not hide the others)
      print(f"{name:<42}  failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
      continue
    rate = batch * seq / result["seconds"]
    base = base or {"rate": rate, "gb": result["peak_gb"]}
    print(f"{name:<42}{rate:>11,.0f}{result['peak_gb'] * 1e3:>10,.1f}{rate / base['rate']:>8.2f}"
          f"{result['peak_gb'] / base['gb']:>8.2f}", flush=True)


if __name__ == "__main__":
  main()
