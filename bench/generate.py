"""Generation throughput against the batched forward: new tokens/s of KV-cache sampling (as
`csd-jax generate` runs it: a key per row, temperature 0.8, top-p 0.95) beside the
teacher-forced forward's tokens/s of the same model, measured in one run, and their ratio.

    PYTHONPATH=. python bench/generate.py                 # CPU shapes: tiny and small models
    PYTHONPATH=. python bench/generate.py --sizes paper   # Qwen2.5-1.5B / 7B shapes (GPU)
    PYTHONPATH=. python bench/generate.py --greedy        # and greedy decoding (no top-p sort)

Random weights from a config (speed depends on the shapes, not the weights); no stop token, so
every row decodes all its new tokens. Generation counts the new tokens only (the prompt's
prefill is inside its time); the forward counts every token of [batch, length] rows, with the
LM head over all of them. Imports neither grain, tensorflow-datasets nor rouge-score.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.presets import QWEN25_7B, QWEN25_15B, shrink
from csd_jax.models import generate, init_random
from csd_jax.sampling import GREEDY, Sampling

SAMPLING = Sampling(temperature=0.8, top_p=0.95)   # the official CSD generation script's
QWEN_TINY = shrink(QWEN25_15B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, vocab_size=1024)
QWEN_SMALL = shrink(QWEN25_15B, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=768, vocab_size=32000)
# name: (config, generation batch, prompt length, new tokens, forward batch, forward length)
SIZES: dict[str, list[tuple[str, dict, int, int, int, int, int]]] = {
    "tiny": [("qwen-tiny", QWEN_TINY, 8, 32, 32, 8, 64)],
    "small": [("qwen-tiny", QWEN_TINY, 8, 32, 32, 8, 64),
              ("qwen-small", QWEN_SMALL, 8, 64, 64, 4, 128)],
    "paper": [("qwen2.5-1.5b", QWEN25_15B, 128, 256, 256, 8, 512),
              ("qwen2.5-7b", QWEN25_7B, 64, 256, 256, 4, 512)],
}


def _median_seconds(run, repeats: int) -> float:
  jax.block_until_ready(run())   # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_row(config: dict, batch: int, prompt_len: int, new_tokens: int, fwd_batch: int,
              fwd_len: int, *, dtype, repeats: int, greedy: bool) -> dict[str, float]:
  """tokens/s of sampling (and greedy decoding) and of the forward, for one model shape."""
  model = init_random(config, seed=0, dtype=dtype, param_dtype=dtype)
  vocab = model.cfg.vocab_size
  prompt = np.asarray(jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, vocab),
                      np.int32)
  keys = jax.random.split(jax.random.key(2), batch)

  def sample(sampling: Sampling):
    return lambda: generate(model, prompt, max_new_tokens=new_tokens, sampling=sampling,
                            row_keys=keys)

  result = {"sampled": batch * new_tokens / _median_seconds(sample(SAMPLING), repeats)}
  if greedy:
    result["greedy"] = batch * new_tokens / _median_seconds(sample(GREEDY), repeats)
  ids = jax.random.randint(jax.random.key(3), (fwd_batch, fwd_len), 0, vocab)
  forward = nnx.jit(lambda m, x: m(x))
  result["forward"] = fwd_batch * fwd_len / _median_seconds(lambda: forward(model, ids), repeats)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default=None,
                      help="default: small on CPU, paper on an accelerator")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--greedy", action="store_true", help="also time greedy decoding")
  args = parser.parse_args()
  backend = jax.default_backend()
  sizes = args.sizes or ("small" if backend == "cpu" else "paper")
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  print(f"bench/generate.py on {jax.devices()[0].device_kind} ({backend}), {sizes} sizes, "
        f"{jnp.dtype(dtype).name}, median of {args.repeats}; generation: T={SAMPLING.temperature}"
        f" top-p {SAMPLING.top_p}, a key per row, new tokens only; forward: logits of every "
        "token")
  header = (f"{'model':<14}{'gen B x P+N':>14}{'gen tok/s':>12}"
            + (f"{'greedy tok/s':>14}" if args.greedy else "")
            + f"{'fwd B x T':>11}{'fwd tok/s':>12}{'gen/fwd':>9}")
  print(header)
  for name, config, batch, prompt_len, new_tokens, fwd_batch, fwd_len in SIZES[sizes]:
    r = bench_row(config, batch, prompt_len, new_tokens, fwd_batch, fwd_len, dtype=dtype,
                  repeats=args.repeats, greedy=args.greedy)
    print(f"{name:<14}{f'{batch}x{prompt_len}+{new_tokens}':>14}{r['sampled']:>12,.0f}"
          + (f"{r['greedy']:>14,.0f}" if args.greedy else "")
          + f"{f'{fwd_batch}x{fwd_len}':>11}{r['forward']:>12,.0f}"
          f"{r['sampled'] / r['forward']:>9.3f}", flush=True)


if __name__ == "__main__":
  main()
