"""Fused vs unfused head + loss, forward and backward: time and temporary memory, side by side.

Both paths include the LM-head matmuls of student and teacher (hidden @ head), so they do the
same work; the unfused path materialises the `[N, V]` logits, the fused one walks token chunks.
With torch installed, the official-style PyTorch CSD (logits materialised, difference formed in
the logits' dtype, gradient through a detached surrogate) runs on the same inputs.

    PYTHONPATH=. python bench/loss.py                 # small shapes on CPU, paper shapes on GPU
    PYTHONPATH=. python bench/loss.py --sizes paper   # [4096 x 50257], [4096 x 151936], ...

Memory is XLA's compiled memory analysis (temporary buffers of the jitted fwd+bwd), and the
device's peak where the backend reports one. Every row's ratios come from this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from csd_jax.losses import fused_logit_loss, logit_loss

# (tokens, vocab, student hidden, teacher hidden)
SIZES = {
    "tiny": [(256, 1024, 32, 64)],  # a smoke test (tests/test_bench.py)
    "small": [(4096, 8192, 128, 256), (2048, 32768, 128, 256)],
    "paper": [(4096, 50257, 768, 1600), (4096, 151936, 1536, 3584), (2048, 256000, 2048, 3072)],
}


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _inputs(n, vocab, hs, ht, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  normal = lambda k, shape, scale: (jax.random.normal(k, shape) * scale).astype(dtype)  # noqa
  return (normal(keys[0], (n, hs), 1.0), normal(keys[1], (hs, vocab), hs**-0.5 * 2),
          normal(keys[2], (n, ht), 1.0), normal(keys[3], (ht, vocab), ht**-0.5 * 2),
          jnp.ones((n,), bool))


def bench_jax(name: str, args, fused: bool, chunk_size: int, repeats: int) -> dict:
  if fused:
    loss = lambda h, w, ht, wt, m: fused_logit_loss(  # noqa: E731
        name, h, w, ht, wt, m, chunk_size=chunk_size)
  else:
    loss = lambda h, w, ht, wt, m: logit_loss(  # noqa: E731
        name, jnp.dot(h, w, preferred_element_type=jnp.float32),
        jnp.dot(ht, wt, preferred_element_type=jnp.float32), m)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  ms = _time_ms(lambda: compiled(*args), repeats)
  return {"ms": ms, "temp_mb": temp / 2**20}


def bench_torch_csd(args, repeats: int) -> dict | None:
  try:
    import torch
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {jnp.bfloat16: torch.bfloat16}.get(args[0].dtype.type, torch.float32)
  h, w, ht, wt = (torch.from_numpy(np.array(a, np.float32)).to(device, dtype) for a in args[:4])
  h.requires_grad_(True)
  w.requires_grad_(True)

  def step():
    logits, teacher_logits = h @ w, (ht @ wt).detach()
    q = torch.softmax(logits.float(), -1).detach()
    d = logits - teacher_logits  # the official code forms d in the logits' dtype
    grad = q * (d - (q * d).sum(-1, keepdim=True))
    surrogate = (grad.detach() * logits).sum(-1).mean()
    surrogate.backward()
    return surrogate

  for _ in range(2):
    step()
  if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    if device == "cuda":
      torch.cuda.synchronize()
    times.append((time.perf_counter() - start) * 1e3)
  peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
  return {"ms": statistics.median(times), "peak_mb": peak}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default=None,
                      help="default: paper on GPU/TPU, small on CPU")
  parser.add_argument("--chunk-size", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--losses", default="csd,fkl")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  backend = jax.default_backend()
  sizes = args.sizes or ("small" if backend == "cpu" else "paper")
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  print(f"bench/loss.py on {jax.devices()[0].device_kind} ({backend}), {sizes} sizes, inputs "
        f"{jnp.dtype(dtype).name}, chunk {args.chunk_size}, median of {args.repeats}")
  header = (f"{'shape N x V (Hs/Ht)':<28}{'loss':<6}{'unfused ms':>11}{'fused ms':>10}"
            f"{'fused/unf':>10}{'unf temp MB':>12}{'fused temp MB':>14}{'mem ratio':>10}"
            f"{'torch ms':>10}{'torch/fused':>12}")
  print(header)
  print("-" * len(header))
  for n, vocab, hs, ht in SIZES[sizes]:
    inputs = _inputs(n, vocab, hs, ht, dtype)
    torch_row = None if args.no_torch else bench_torch_csd(inputs, args.repeats)
    for name in args.losses.split(","):
      unfused = bench_jax(name, inputs, False, args.chunk_size, args.repeats)
      fused = bench_jax(name, inputs, True, args.chunk_size, args.repeats)
      torch_ms = torch_row["ms"] if (torch_row and name == "csd") else float("nan")
      print(f"{f'{n} x {vocab} ({hs}/{ht})':<28}{name:<6}{unfused['ms']:>11.2f}"
            f"{fused['ms']:>10.2f}{fused['ms'] / unfused['ms']:>10.2f}"
            f"{unfused['temp_mb']:>12.0f}{fused['temp_mb']:>14.0f}"
            f"{fused['temp_mb'] / unfused['temp_mb']:>10.2f}{torch_ms:>10.2f}"
            f"{torch_ms / fused['ms']:>12.2f}", flush=True)
    if torch_row and torch_row["peak_mb"] == torch_row["peak_mb"]:
      print(f"  torch official-style CSD peak device memory: {torch_row['peak_mb']:.0f} MB")


if __name__ == "__main__":
  main()
