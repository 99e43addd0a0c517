"""Forward throughput of the model ports: tokens/s and model TFLOP/s of random-init models.

    PYTHONPATH=. python bench/models.py                 # small shapes on CPU, paper shapes on GPU
    PYTHONPATH=. python bench/models.py --sizes paper   # GPT-2-XL (8 x 512), Gemma-7B (2 x 1024),
                                                        # Qwen2.5-7B / 1.5B (4 x 1024),
                                                        # Gemma-2-9B / 2B (2 x 1024)

FLOPs count the matmuls of the forward pass: 2 x (non-embedding parameters + LM head) per token
plus attention's 4 x T x D per token per layer (causal masking not discounted).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench.presets import MODELS
from csd_jax.models import init_random

SIZES = MODELS  # (name, transformers config, batch, sequence length): bench/presets.py


def forward_flops_per_token(model, seq_len: int) -> float:
  cfg = model.cfg
  params = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model)))
  embedding_params = cfg.vocab_size * cfg.hidden_size
  if model.pos_embed is not None:
    embedding_params += model.pos_embed.get_value().size
  # + the LM head: the embedding's transpose when tied (an untied head is among the params)
  tied_head = cfg.vocab_size * cfg.hidden_size if model.lm_head is None else 0
  matmul_params = params - embedding_params + tied_head
  attention = 4 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return 2 * matmul_params + attention


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  backend = jax.default_backend()
  sizes = args.sizes or ("small" if backend == "cpu" else "paper")
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  print(f"bench/models.py on {jax.devices()[0].device_kind} ({backend}), {sizes} sizes, "
        f"{jnp.dtype(dtype).name} params and compute, median of {args.repeats}")
  print(f"{'model':<14}{'batch':>10}{'ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}")
  for name, hf_config, batch, seq_len in SIZES[sizes]:
    model = init_random(hf_config, seed=0, dtype=dtype, param_dtype=dtype)
    ids = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, model.cfg.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))
    jax.block_until_ready(forward(model, ids))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(forward(model, ids))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch * seq_len
    tflops = forward_flops_per_token(model, seq_len) * tokens / seconds / 1e12
    print(f"{name:<14}{f'{batch}x{seq_len}':>10}{seconds * 1e3:>10.1f}{tokens / seconds:>12,.0f}"
          f"{tflops:>10.2f}", flush=True)


if __name__ == "__main__":
  main()
