"""The full distillation step, csd-jax against PyTorch + transformers, side by side in one run.

    PYTHONPATH=. python bench/step.py                 # small shapes on CPU, paper shapes on GPU
    PYTHONPATH=. python bench/step.py --sizes paper --torch-compile
    PYTHONPATH=. python bench/step.py --memory-only   # compile only: fused vs unfused memory

One step = teacher forward (frozen, bf16) + student forward / backward + CSD (S,S) + AdamW,
on random-init models of the paper's shapes and random tokens (every position a target):

- csd-jax: the jitted train step of `csd_jax.train.step` (fused loss, donation), models born
  on a 1-device mesh;
- PyTorch: transformers' models, teacher in bf16 under no_grad, student float32 with bf16
  autocast, logits materialised and the official-style CSD (gradient through a detached
  surrogate), torch.optim.AdamW; eager, and `torch.compile` with `--torch-compile`.

Reported: tokens/s, model TFLOP/s and MFU (against the chip's bf16 peak where known), and
memory (JAX: XLA's compiled memory analysis of the step; torch: the CUDA peak). No
grain / tensorflow-datasets needed: the GPU host has neither. With `--memory-only` nothing runs:
the step is compiled on abstract inputs, fused and unfused, and XLA's memory analysis printed
(bench/memory.py), on any backend. Pairs with two vocabularies (Qwen2.5-7B's 152064,
1.5B's 151936) distil over the shared one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bench.presets import PAIRS, shared_vocab
from csd_jax.config import OptimConfig
from csd_jax.metrics import peak_flops_per_device
from csd_jax.models import init_random
from csd_jax.runtime.sharding import make_mesh
from csd_jax.run.state import init_train_state, make_optimizer
from csd_jax.metrics.flops import model_flops_per_token
from csd_jax.train.step import Objective, make_train_step

# name: (teacher config, student config, batch, sequence length); see bench/presets.py.
SIZES = PAIRS


def _median_seconds(step, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_jax(teacher_cfg: dict, student_cfg: dict, batch: int, seq: int, repeats: int,
              compute: Any, *, teacher_dtype: Any = None, fused: bool = True,
              remat: str = "none", attention_impl: str | None = None, donate: bool = True
              ) -> dict[str, float]:
  """The csd-jax step's median seconds, model FLOPs and XLA memory. The keyword options are
  the levers of bench/levers.py (the defaults are the trainer's)."""
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  teacher_dtype = compute if teacher_dtype is None else teacher_dtype
  teacher = init_random(teacher_cfg, seed=1, dtype=teacher_dtype, param_dtype=teacher_dtype,
                        mesh=mesh, attention_impl=attention_impl)
  student = init_random(student_cfg, seed=2, dtype=compute, mesh=mesh, remat=remat,
                        attention_impl=attention_impl)
  tx, schedule = make_optimizer(OptimConfig(lr=1e-4, schedule="constant"), 100)
  graphdef, state = init_train_state(student, tx, mesh)
  teacher_graphdef, teacher_state = nnx.split(teacher)
  step = jax.jit(make_train_step(graphdef, teacher_graphdef, tx, schedule,
                                 Objective("csd", {}, fused=fused,
                                           vocab_size=shared_vocab(teacher_cfg, student_cfg)),
                                 grad_accum=1),
                 donate_argnums=(0,) if donate else ())
  ids = jax.random.randint(jax.random.key(3), (batch, seq + 1), 0,
                           shared_vocab(teacher_cfg, student_cfg))
  data = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
          "attention_mask": jnp.ones((batch, seq), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq))}
  compiled = step.lower(state, teacher_state, data, None).compile()
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], teacher_state, data, None)
    jax.block_until_ready(metrics["loss"])

  run()  # warm-up
  seconds = _median_seconds(run, repeats)
  # XLA's own accounting of the step (inputs, outputs not aliased to them, temporaries): a
  # per-pair figure, where the device's peak counter would keep the largest pair's.
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  flops = (model_flops_per_token(student, seq, backward=True)
           + model_flops_per_token(teacher, seq, backward=False)) * batch * seq
  return {"seconds": seconds, "flops": flops, "peak_gb": peak / 1e9}


def bench_torch(teacher_cfg: dict, student_cfg: dict, batch: int, seq: int, repeats: int,
                compile_model: bool) -> dict[str, float] | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)

  def model(cfg: dict, dtype):
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device(device):  # initialised on the GPU: a 7B model on the host takes minutes
      return transformers.AutoModelForCausalLM.from_config(config).to(dtype)

  teacher = model(teacher_cfg, torch.bfloat16).eval()
  student = model(student_cfg, torch.float32).train()
  optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
  vocab = shared_vocab(teacher_cfg, student_cfg)
  ids = torch.randint(0, vocab, (batch, seq), device=device)
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

  def loss_fn(input_ids):
    with torch.no_grad():
      teacher_logits = teacher(input_ids).logits[..., :vocab]
    with autocast:
      logits = student(input_ids).logits[..., :vocab]
    q = torch.softmax(logits.float(), -1).detach()
    d = logits - teacher_logits  # official-style: formed in the logits' dtype
    grad = q * (d - (q * d).sum(-1, keepdim=True))
    return (grad.detach() * logits).sum(-1).mean()

  if compile_model:
    loss_fn = torch.compile(loss_fn)

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss_fn(ids).backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  run()
  run()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  seconds = _median_seconds(run, repeats)
  peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")
  return {"seconds": seconds, "peak_gb": peak}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default=None)
  parser.add_argument("--only", default=None, help="comma-separated pair names")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-compile", action="store_true")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--memory-only", action="store_true",
                      help="compile only (abstract inputs) and print XLA's memory analysis, "
                           "fused vs unfused loss; default sizes: paper, on any backend")
  parser.add_argument("--chunk-size", type=int, default=1024, help="with --memory-only")
  args = parser.parse_args()
  backend = jax.default_backend()
  if args.memory_only:
    from bench.memory import print_memory_table

    sizes = args.sizes or "paper"
    names = args.only.split(",") if args.only else list(SIZES[sizes])
    print_memory_table(SIZES[sizes], names, chunk_size=args.chunk_size, compute=jnp.bfloat16,
                       teacher_dtype=jnp.bfloat16)
    return
  sizes = args.sizes or ("small" if backend == "cpu" else "paper")
  compute = jnp.float32 if backend == "cpu" else jnp.bfloat16
  peak_flops = peak_flops_per_device(jax.devices()[0])
  print(f"bench/step.py on {jax.devices()[0].device_kind} ({backend}), {sizes} sizes, CSD (S,S) "
        f"+ AdamW, median of {args.repeats}; bf16 peak "
        f"{f'{peak_flops / 1e12:.0f} TFLOP/s' if peak_flops else 'unknown'}")
  header = (f"{'pair':<24}{'batch':>9}{'jax tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'jax GB':>8}"
            f"{'torch tok/s':>12}{'torch GB':>9}{'jax/torch':>10}")
  if args.torch_compile:
    header += f"{'compile tok/s':>14}{'jax/compile':>12}"
  print(header)
  names = args.only.split(",") if args.only else list(SIZES[sizes])
  for name in names:
    teacher_cfg, student_cfg, batch, seq = SIZES[sizes][name]
    tokens = batch * seq
    ours = bench_jax(teacher_cfg, student_cfg, batch, seq, args.repeats, compute)
    rate = tokens / ours["seconds"]
    tflops = ours["flops"] / ours["seconds"] / 1e12
    mfu = f"{tflops * 1e12 / peak_flops:.0%}" if peak_flops else "-"
    row = (f"{name:<24}{f'{batch}x{seq}':>9}{rate:>11,.0f}{tflops:>9.2f}{mfu:>7}"
           f"{ours['peak_gb']:>8.2f}")
    eager = None if args.no_torch else bench_torch(teacher_cfg, student_cfg, batch, seq,
                                                   args.repeats, False)
    if eager:
      torch_rate = tokens / eager["seconds"]
      row += f"{torch_rate:>12,.0f}{eager['peak_gb']:>9.2f}{rate / torch_rate:>10.2f}"
    else:
      row += f"{'-':>12}{'-':>9}{'-':>10}"
    if args.torch_compile and not args.no_torch:
      compiled = bench_torch(teacher_cfg, student_cfg, batch, seq, args.repeats, True)
      compile_rate = tokens / compiled["seconds"]
      row += f"{compile_rate:>14,.0f}{rate / compile_rate:>12.2f}"
    print(row, flush=True)


if __name__ == "__main__":
  main()
