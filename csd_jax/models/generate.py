"""Batched sampling with a KV cache in one jitted loop.

Prompts are left-padded to a common length (`prompt_mask` marks the real tokens), so every
sequence's next token goes into the same cache slot; positions count real tokens only, so a
padded prompt continues exactly as it would alone. How tokens are drawn is a `Sampling`
(csd_jax/sampling.py): temperature 0 is greedy; otherwise top-k (0 = off) and top-p (1 = off)
filter the tempered logits, and `no_repeat_ngram_size` n (0 = off) forbids any token that would
repeat an n-gram of the real tokens so far (prompt included, left padding not). A sequence
stops at the first of its stop ids (any of them: a model may have several, e.g. Llama 3.1's
eos ids and a chat template's end-of-turn token; `csd_jax.data.chat.stop_ids` gathers them),
keeps that token and is padded with `pad_id` after it; the loop ends when every sequence has
stopped.

Randomness: one key for the batch (`seed`), split at every step; or one key per row
(`row_keys`), split per row, so that a row's tokens depend on its own key and prompt only, never
on which rows share its batch (`csd-jax generate` derives a row's key from its prompt and sample
index, which makes a resumed run draw what an uninterrupted one draws).

`sample_loop` is the un-jitted core, for callers that generate inside their own jitted function
(on-policy distillation); `generate` is the jitted entry point.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jax.sharding import NamedSharding

from csd_jax.models.transformer import CausalLM, positions_from_mask
from csd_jax.sampling import GREEDY, Sampling
from csd_jax.runtime.sharding import batch_sharding, data_parallel_size

Array = jax.Array


def filter_logits(logits: Array, sampling: Sampling) -> Array:
  """Tempered logits with everything outside the top-k / nucleus set to -inf."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  top_k, top_p = sampling.top_k, sampling.top_p
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


def sample_token(logits: Array, key: Array, sampling: Sampling) -> Array:
  """One token per row of `logits` [B, V]: greedy at temperature 0. `key` is one key, or one
  per row ([B])."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, sampling)
  if key.ndim:   # a key per row: each row's draw uses its own key alone
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _split(key: Array) -> tuple[Array, Array]:
  """(the next step's key, this step's key): of one key, or row by row of a key per row."""
  if key.ndim:
    pairs = jax.vmap(jax.random.split)(key)
    return pairs[:, 0], pairs[:, 1]
  key, sub = jax.random.split(key)
  return key, sub


def ban_repeated_ngrams(logits: Array, tokens: Array, real: Array, length: Array | int,
                        n: int) -> Array:
  """`logits` [B, V] with -inf on every token that would complete an n-gram already present.

  `tokens` [B, S] holds the sequence so far in its first `length` slots (later slots are
  ignored); `real` [B, S] marks its real tokens (left padding is not text).
  """
  size = tokens.shape[1]
  if n > size:  # no n-gram fits in the sequence: nothing to ban
    return logits
  starts = jnp.arange(size - n + 1)
  # window[b, j, k] = tokens[b, j + k]; the tail is the last n - 1 tokens of the sequence.
  window = tokens[:, starts[:, None] + jnp.arange(n)[None, :]]
  window_real = jnp.all(real[:, starts[:, None] + jnp.arange(n)[None, :]], axis=-1)
  tail = lax.dynamic_slice_in_dim(tokens, length - (n - 1), n - 1, axis=1) if n > 1 else (
      tokens[:, :0])
  tail_real = lax.dynamic_slice_in_dim(real, length - (n - 1), n - 1, axis=1) if n > 1 else (
      real[:, :0])
  matches = (jnp.all(window[:, :, :n - 1] == tail[:, None, :], axis=-1) & window_real
             & jnp.all(tail_real, axis=-1, keepdims=True) & (starts[None, :] + n <= length))
  banned = jnp.where(matches, window[:, :, n - 1], logits.shape[-1])  # V: dropped below
  rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], banned.shape)
  return logits.at[rows, banned].set(-jnp.inf, mode="drop")


class _Decoding(NamedTuple):
  """The decoding loop's carry."""

  step: Array | int     # new tokens drawn so far
  cache: Any            # the KV cache
  logits: Array         # [B, V] for the next token
  position: Array       # [B] the next token's position
  done: Array           # [B] rows that drew an eos
  tokens: Array         # [B, P + new] prompt and new tokens so far
  key: Array


def sample_loop(model: CausalLM, prompt: Array, prompt_mask: Array, key: Array, *,
                max_new_tokens: int, sampling: Sampling, eos_ids: tuple[int, ...],
                pad_id: int, vocab_size: int | None = None) -> Array:
  """New tokens [B, max_new_tokens] after left-padded prompts [B, P] (traceable: call it
  under jit). `key`: one key, or one per row ([B]). `vocab_size` limits the tokens drawn to
  the first ones (a teacher with fewer embedding rows than the student must be able to read
  every sampled token)."""
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  kv_valid = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], 1)
  positions = positions_from_mask(prompt_mask)
  cache = model.init_cache(batch, total)
  hidden, cache = model.hidden_states(prompt, prompt_mask, positions, cache=cache,
                                      cache_index=0, kv_valid=kv_valid)
  tokens = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad_id, jnp.int32)], 1)
  start = _Decoding(step=0, cache=cache, logits=model.logits(hidden[:, -1]),
                    position=positions[:, -1] + 1, done=jnp.zeros((batch,), bool),
                    tokens=tokens, key=key)
  eos = jnp.asarray(eos_ids, jnp.int32) if eos_ids else None
  n = sampling.no_repeat_ngram_size

  def cond(carry: _Decoding) -> Array:
    return (carry.step < max_new_tokens) & ~jnp.all(carry.done)

  def body(carry: _Decoding) -> _Decoding:
    i, logits, done = carry.step, carry.logits, carry.done
    key, sub = _split(carry.key)
    if n:
      logits = ban_repeated_ngrams(logits.astype(jnp.float32), carry.tokens, kv_valid,
                                   prompt_len + i, n)
    token = jnp.where(done, pad_id, sample_token(logits[:, :vocab_size], sub, sampling))
    tokens = lax.dynamic_update_slice_in_dim(carry.tokens, token[:, None], prompt_len + i,
                                             axis=1)
    if eos is not None:
      done = done | jnp.isin(token, eos)
    hidden, cache = model.hidden_states(token[:, None], None, carry.position[:, None],
                                        cache=carry.cache, cache_index=prompt_len + i,
                                        kv_valid=kv_valid)
    return _Decoding(step=i + 1, cache=cache, logits=model.logits(hidden[:, -1]),
                     position=carry.position + 1, done=done, tokens=tokens, key=key)

  return lax.while_loop(cond, body, start).tokens[:, prompt_len:]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "eos_ids", "pad_id"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: Array, prompt_mask: Array,
              key: Array, *, max_new_tokens: int, sampling: Sampling,
              eos_ids: tuple[int, ...], pad_id: int) -> Array:
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):   # raw data of a key per row
    key = jax.random.wrap_key_data(key)
  return sample_loop(nnx.merge(graphdef, state), prompt, prompt_mask, key,
                     max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                     pad_id=pad_id)


def generate(model: CausalLM, prompt_ids: Array, *, max_new_tokens: int,
             sampling: Sampling = GREEDY, seed: int = 0,
             eos_id: int | Sequence[int] | None = None, prompt_mask: Array | None = None,
             pad_id: int | None = None, row_keys: Array | None = None,
             **sampling_fields: float) -> Array:
  """Continue left-padded prompts [B, P]: returns the new tokens [B, max_new_tokens].

  The jitted loop compiles once per (batch, prompt width, max_new_tokens, sampling): callers
  that loop over batches keep those fixed (see csd_jax/eval/generation.py).

  Args:
    sampling: how tokens are drawn (default greedy); `Sampling`'s fields given as keywords
      (`temperature=1.0, top_p=0.9`) replace those of `sampling`.
    seed: the sampling seed (the same seed gives the same samples).
    row_keys: instead of `seed`, one PRNG key per prompt ([B], `jax.random.key` typed): a
      row's tokens then depend on its key and prompt only, not on the other rows.
    eos_id: the token id, or ids, that end a sequence: pass `csd_jax.data.chat.stop_ids(
      tokenizer, model)` (every eos id and the chat end-of-turn token), not the tokenizer's
      eos alone. pad_id: what follows the end (default: the first of them, or 0).
    prompt_mask: [B, P], 1 for real tokens; padding must be on the left.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
  if sampling_fields:
    names = {f.name for f in dataclasses.fields(Sampling)}
    unknown = sorted(set(sampling_fields) - names)
    if unknown:
      raise TypeError(f"generate() got unexpected keyword arguments {unknown}; sampling "
                      f"fields: {', '.join(sorted(names))}")
    sampling = dataclasses.replace(sampling, **sampling_fields)
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt_ids.shape, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
  if not bool(jnp.all(prompt_mask[:, -1] == 1)):
    raise ValueError("prompts must be left-padded: the last position of every prompt must be a "
                     "real token (prompt_mask[:, -1] == 1)")
  eos_ids = () if eos_id is None else tuple(dict.fromkeys(int(e) for e in np.atleast_1d(eos_id)))
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0
  graphdef, state = nnx.split(model)
  rows = prompt_ids.shape[0]
  if row_keys is None:
    prompt_ids, prompt_mask = _shard_rows(state, prompt_ids, prompt_mask)
    key = jax.random.key(seed)
  else:
    if row_keys.shape != (rows,):
      raise ValueError(f"row_keys of shape {row_keys.shape}: expected one key per prompt "
                       f"({rows},)")
    # raw key data: padded and sharded like the rows, wrapped again inside the jitted loop
    prompt_ids, prompt_mask, key = _shard_rows(state, prompt_ids, prompt_mask,
                                               jax.random.key_data(row_keys))
  out = _generate(graphdef, state, prompt_ids, prompt_mask, key,
                  max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                  pad_id=int(pad_id))
  return out[:rows]


def _shard_rows(state: nnx.State, *arrays: Array) -> tuple[Array, ...]:
  """For a model on a mesh: the rows of `arrays` (prompts, masks, keys) split over its
  data-parallel axes (padded with copies of the last row to a multiple of them), so that each
  device decodes its own rows."""
  sharding = next((x.sharding for x in jax.tree.leaves(state)
                   if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
  if sharding is None:
    return arrays
  mesh = sharding.mesh
  extra = -arrays[0].shape[0] % data_parallel_size(mesh)
  if extra:
    arrays = tuple(jnp.concatenate([a, jnp.repeat(a[-1:], extra, 0)]) for a in arrays)
  rows = batch_sharding(mesh)
  return tuple(jax.device_put(a, rows) for a in arrays)
