"""Batched sampling with a KV cache in one jitted loop.

Prompts are left-padded to a common length (`prompt_mask` marks the real tokens), so every
sequence's next token goes into the same cache slot; positions count real tokens only, so a
padded prompt continues exactly as it would alone. Temperature 0 is greedy; otherwise top-k
(0 = off) and top-p (1 = off) filter the tempered logits. A sequence stops at its first eos
token and is padded with `pad_id` after it; the loop ends when every sequence has stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from csd_jax.models.transformer import CausalLM, positions_from_mask

Array = jax.Array


def filter_logits(logits: Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Tempered logits with everything outside the top-k / nucleus set to -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)  # the top token always stays
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_token(logits: Array, key: Array, *, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> Array:
  """One token per row of `logits` [B, V]: greedy at temperature 0."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_ids", "pad_id"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: Array, prompt_mask: Array,
              key: Array, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              eos_ids: tuple[int, ...], pad_id: int) -> Array:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  kv_valid = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], 1)
  positions = positions_from_mask(prompt_mask)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  hidden, cache = model.hidden_states(prompt, prompt_mask, positions, cache=cache,
                                      cache_index=0, kv_valid=kv_valid)
  logits = model.logits(hidden[:, -1])
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  state0 = (0, cache, logits, positions[:, -1] + 1, done, out, key)
  eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, position, done, out, key = carry
    key, sub = jax.random.split(key)
    token = sample_token(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    out = out.at[:, i].set(token)
    if eos is not None:
      done = done | jnp.isin(token, eos)
    hidden, cache = model.hidden_states(token[:, None], None, position[:, None], cache=cache,
                                        cache_index=prompt_len + i, kv_valid=kv_valid)
    return i + 1, cache, model.logits(hidden[:, -1]), position + 1, done, out, key

  return lax.while_loop(cond, body, state0)[5]


def generate(model: CausalLM, prompt_ids: Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | Sequence[int] | None = None, prompt_mask: Array | None = None,
             pad_id: int | None = None) -> Array:
  """Continue left-padded prompts [B, P]: returns the new tokens [B, max_new_tokens].

  Args:
    temperature: 0 for greedy decoding; otherwise the sampling temperature.
    top_k: keep the k most likely tokens (0 = all). top_p: nucleus mass (1 = all).
    seed: the sampling seed (the same seed gives the same samples).
    eos_id: token id(s) that end a sequence. pad_id: what follows the end (default: the
      first eos id, or 0).
    prompt_mask: [B, P], 1 for real tokens; padding must be on the left.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need "
                     "temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt_ids.shape, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  if not bool(jnp.all(prompt_mask[:, -1] == 1)):
    raise ValueError("prompts must be left-padded: the last position of every prompt must be a "
                     "real token (prompt_mask[:, -1] == 1)")
  eos_ids = () if eos_id is None else tuple(int(e) for e in jnp.atleast_1d(jnp.asarray(eos_id)))
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_ids, prompt_mask, jax.random.key(seed),
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), eos_ids=eos_ids, pad_id=int(pad_id))
