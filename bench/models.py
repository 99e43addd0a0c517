"""Forward throughput of the model ports: tokens/s and model TFLOP/s of random-init models.

    PYTHONPATH=. python bench/models.py                 # small shapes on CPU, paper shapes on GPU
    PYTHONPATH=. python bench/models.py --sizes paper   # GPT-2-XL (8 x 512), Gemma-7B (2 x 1024)

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

from csd_jax.models import init_random

GPT2_XL = dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257,
               n_positions=1024)
GEMMA_7B = dict(model_type="gemma", hidden_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                intermediate_size=24576, vocab_size=256000, max_position_embeddings=8192)
SIZES = {
    "tiny": [("gpt2-tiny", dict(GPT2_XL, n_embd=64, n_layer=2, n_head=4, vocab_size=1024), 2, 64)],
    "small": [("gpt2-xl/16", dict(GPT2_XL, n_embd=400, n_layer=6, n_head=5), 4, 256),
              ("gemma-7b/16", dict(GEMMA_7B, hidden_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                                   intermediate_size=1536, vocab_size=32000), 2, 256)],
    "paper": [("gpt2-xl", GPT2_XL, 8, 512), ("gemma-7b", GEMMA_7B, 2, 1024)],
}


def forward_flops_per_token(model, seq_len: int) -> float:
  cfg = model.cfg
  params = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model)))
  embedding_params = cfg.vocab_size * cfg.hidden_size
  if model.pos_embed is not None:
    embedding_params += model.pos_embed.get_value().size
  matmul_params = params - embedding_params + cfg.vocab_size * cfg.hidden_size  # + LM head
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
