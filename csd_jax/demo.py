"""A short CSD distillation between two small random language models on synthetic tokens.

The stand-in main job until the trainer lands: it runs the real loss code (the fused head + CSD
path) in a jitted optax step, and prints the CSD loss falling. The models here are deliberately
minimal (embedding, one residual MLP, a final norm, an LM head); the real ports live elsewhere.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from csd_jax.losses import fused_logit_loss


class TinyLM(nnx.Module):
  """Embedding -> residual MLP -> RMSNorm; the LM head is returned separately (fused loss)."""

  def __init__(self, vocab: int, width: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.up = nnx.Linear(width, 4 * width, rngs=rngs)
    self.down = nnx.Linear(4 * width, width, rngs=rngs)
    self.norm = nnx.RMSNorm(width, rngs=rngs)
    self.head = nnx.Param(jax.random.normal(rngs.params(), (width, vocab)) * width**-0.5)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    x = x + self.down(jax.nn.gelu(self.up(x)))
    return self.norm(x)


def run(steps: int = 60, vocab: int = 512, batch: int = 8, seq_len: int = 64, seed: int = 0,
        loss: str = "csd", log_every: int = 10) -> tuple[float, float]:
  """Distil a width-128 teacher into a width-32 student; returns (first, last) loss."""
  teacher = TinyLM(vocab, 128, nnx.Rngs(seed + 1))
  student = TinyLM(vocab, 32, nnx.Rngs(seed + 2))
  optimizer = nnx.Optimizer(student, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(student: TinyLM, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    teacher_hidden = teacher(tokens)

    def objective(model: TinyLM) -> jax.Array:
      return fused_logit_loss(loss, model(tokens), model.head[...], teacher_hidden,
                              teacher.head[...], chunk_size=128)

    value, grads = nnx.value_and_grad(objective)(student)
    optimizer.update(student, grads)
    return value

  key = jax.random.key(seed)
  print(f"csd-jax demo: distilling a random width-128 LM into a width-32 one with {loss!r} "
        f"(vocab {vocab}, batch {batch} x {seq_len}, {steps} steps, {jax.default_backend()})")
  first = last = float("nan")
  start = time.perf_counter()
  for step in range(1, steps + 1):
    key, sub = jax.random.split(key)
    tokens = jax.random.randint(sub, (batch, seq_len), 0, vocab)
    value = train_step(student, optimizer, tokens)
    if step == 1 or step % log_every == 0 or step == steps:
      last = float(value)
      first = last if step == 1 else first
      rate = step * batch * seq_len / (time.perf_counter() - start)
      print(f"step {step:4d}/{steps}  {loss} {last:.4f}  {rate:,.0f} tokens/s", flush=True)
  print(f"done: {loss} went from {first:.4f} to {last:.4f}")
  return first, last
