"""On-policy distillation: training rows made of the student's own answers (ImitKD, GKD, DistiLLM).

    batch (dataset prompts + responses) -> its prompts, left-padded -> the student samples an
    answer to each (KV cache, inside jit) -> rows in the data's layout -> replay buffer
    -> some or all of the batch's rows replaced by rows drawn from the buffer

Three ways (`onpolicy.mix`) to mix the answers into the batch, `ratio` being their knob:

  imitkd    every step: answers to all the batch's prompts are pushed into the replay buffer,
            and round(ratio x batch) of the batch's rows are replaced by rows drawn from it.
  gkd       a per-step coin with P(heads) = ratio: heads, every row is the student's fresh
            answer (no buffer); tails, the dataset's batch, nothing generated.
  distillm  the official DistiLLM / CSD `--student-gen` "mixed" mode (DistiLLM `finetune.py`,
            `r < args.mixed_alpha`, with `distillm/buffer.py`'s ReplayBuffer, a FIFO deque of
            `capacity` rows): the same coin; heads, answers to all the batch's prompts are
            pushed into the buffer and the WHOLE batch is then drawn from it (uniformly,
            without replacement, fresh answers included); tails, the dataset's batch, nothing
            generated and the buffer untouched.

The rows follow the data's convention (pre-shifted labels: `labels[t]` is the token after
position t), so the teacher scores the student's tokens in the same train step as any other row.
The alignment is exact: the last prompt position predicts the first answer token, and the last
answer token (eos, when sampled) is a target. The official DistiLLM / CSD sampler writes the
answer's labels one position late (`no_model_batch[i, len(prompt):len(full)] = response`, used as
the mask over logits that predict the *next* token): it never trains the prediction of the
first answer token and trains one position past the answer. tests/test_onpolicy.py pins this.

The replay buffer is device arrays inside the train state (replicated: it is small next to the
models), so it is checkpointed with the state and a resumed run draws exactly what it would have.
The coin is a function of the run's seed and the step alone (the official code draws it from
each process's global numpy RNG), so every process takes the same branch and a resumed run
tosses the coins the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from csd_jax.config import OnPolicyConfig
from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.losses import IGNORE_LABEL
from csd_jax.run.state import ROW_KEYS, TrainState
from csd_jax.models.generate import sample_loop

Array = jax.Array
Batch = dict[str, Array]
ONPOLICY_STREAM = 0x0A11CE  # folded into the run's key: on-policy draws never reuse dropout's


def batch_prompts(batch: Mapping[str, Array], max_prompt_length: int, pad_id: int
                  ) -> tuple[Array, Array, Array]:
  """Every row's prompt, left-padded to `max_prompt_length`: (ids, mask, lengths).

  A row's prompt runs up to its first target position, inclusive (that position predicts the
  first response token); a longer prompt keeps its end. A row without targets gets length 0
  (and a one-pad-token prompt, so that generation stays well defined; its answer is dropped).
  """
  ids, labels = batch["input_ids"], batch["labels"]
  valid = labels != IGNORE_LABEL
  full = jnp.where(jnp.any(valid, -1), jnp.argmax(valid, -1) + 1, 0)
  lengths = jnp.minimum(full, max_prompt_length)
  slots = jnp.arange(max_prompt_length)[None, :]
  first_slot = max_prompt_length - lengths[:, None]
  source = jnp.clip(full[:, None] - max_prompt_length + slots, 0, ids.shape[1] - 1)
  mask = (slots >= first_slot) | (slots == max_prompt_length - 1)
  prompt = jnp.where(slots >= first_slot, jnp.take_along_axis(ids, source, axis=1), pad_id)
  return prompt.astype(jnp.int32), mask.astype(jnp.int32), lengths


def answer_rows(prompt: Array, lengths: Array, answer: Array, *, eos_ids: Sequence[int],
                pad_id: int, length: int) -> Batch:
  """Rows [B, length] of prompt + answer (up to its first eos, inclusive), in the data's layout:
  `input_ids` = sequence[:-1], `labels` = sequence[1:] with the prompt's positions ignored."""
  prompt_width, answer_width = prompt.shape[1], answer.shape[1]
  if eos_ids:
    is_eos = jnp.isin(answer, jnp.asarray(tuple(eos_ids), jnp.int32))
    answer_len = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, answer_width)
  else:
    answer_len = jnp.full(answer.shape[:1], answer_width)
  total = (lengths + answer_len)[:, None]        # real tokens of prompt + answer
  start = lengths[:, None]
  k = jnp.arange(length + 1)[None, :]
  from_prompt = jnp.take_along_axis(prompt, jnp.clip(prompt_width - start + k, 0,
                                                     prompt_width - 1), axis=1)
  from_answer = jnp.take_along_axis(answer, jnp.clip(k - start, 0, answer_width - 1), axis=1)
  sequence = jnp.where(k < start, from_prompt, from_answer)
  t = k[:, :-1]
  real = (t < total - 1) & (start > 0)
  targets = real & (t >= start - 1)
  return {"input_ids": jnp.where(real, sequence[:, :-1], pad_id).astype(jnp.int32),
          "labels": jnp.where(targets, sequence[:, 1:], IGNORE_LABEL).astype(jnp.int32),
          "attention_mask": real.astype(jnp.int32),
          "positions": jnp.where(real, t, 0).astype(jnp.int32)}


# ---- the replay buffer: a ring of rows, drawn from uniformly ---------------------------------

def push(buffer: Mapping[str, Any], rows: Mapping[str, Array]) -> dict[str, Any]:
  """`rows` written over the oldest entries (the buffer holds at least one batch)."""
  size = buffer["rows"]["input_ids"].shape[0]
  count = rows["input_ids"].shape[0]
  index = (buffer["cursor"] + jnp.arange(count)) % size
  return {"rows": {k: buffer["rows"][k].at[index].set(rows[k]) for k in ROW_KEYS},
          "filled": jnp.minimum(buffer["filled"] + count, size),
          "cursor": (buffer["cursor"] + count) % size}


def draw(buffer: Mapping[str, Any], key: Array, count: int) -> Batch:
  """`count` distinct filled rows, uniformly at random."""
  size = buffer["rows"]["input_ids"].shape[0]
  score = jnp.where(jnp.arange(size) < buffer["filled"], jax.random.uniform(key, (size,)), 2.0)
  index = jnp.argsort(score)[:count]
  return {k: buffer["rows"][k][index] for k in ROW_KEYS}


def mix_rows(batch: Mapping[str, Array], drawn: Mapping[str, Array]) -> Batch:
  """`batch` with n = len(drawn) of its rows replaced, spread evenly (rows i where
  floor((i + 1) n / B) steps up), so that every data-parallel shard gets its share."""
  rows = batch["input_ids"].shape[0]
  count = drawn["input_ids"].shape[0]
  if count == 0:
    return dict(batch)
  i = jnp.arange(rows)
  slot = (i * count) // rows
  replaced = (((i + 1) * count) // rows > slot)[:, None]
  return {k: jnp.where(replaced, drawn[k][jnp.minimum(slot, count - 1)], batch[k]) if k in
          drawn else batch[k] for k in batch}


# ---- the step-side driver -------------------------------------------------------------------

class OnPolicy:
  """`(state, batch, step) -> (state, batch)` before each train step: the student's answers
  mixed in (the module docstring describes the modes).

  imitkd: answers to every row's prompt are pushed into `state.replay`, and
  round(ratio x batch) rows are drawn from it. gkd: with probability `ratio` (a per-step coin
  seeded by the run's seed, `coin`) every row is replaced by the student's fresh answer;
  otherwise the batch is left as it is and nothing is generated. distillm: the same coin;
  heads, the answers are pushed into `state.replay` and every row is drawn from it; tails,
  batch and state are returned as they are (no generation, no device work).
  """

  def __init__(self, config: OnPolicyConfig, *, student_graphdef: nnx.GraphDef,
               batch_size: int, max_length: int, max_prompt_length: int,
               eos_ids: Sequence[int], pad_id: int, seed: int, vocab_size: int | None = None):
    self.config, self.seed = config, seed
    if config.mix in ("imitkd", "distillm") and config.buffer_size < batch_size:
      # draw() would hand back empty rows, and push() write one slot twice
      raise ValueError(f"onpolicy.buffer_size={config.buffer_size} must hold at least one "
                       f"batch (train.batch_size={batch_size})")
    self.drawn_rows = (int(config.ratio * batch_size + 0.5) if config.mix == "imitkd"
                       else batch_size)
    self.max_length, self.pad_id = max_length, pad_id
    sampling = config.sampling   # a Sampling (csd_jax/sampling.py), checked by the config
    max_new = config.max_new_tokens or max_length - max_prompt_length

    def answers(params, untrained, batch, key) -> Batch:
      student = nnx.merge(student_graphdef, params, untrained)
      prompt, mask, lengths = batch_prompts(batch, max_prompt_length, pad_id)
      answer = sample_loop(student, prompt, mask, key, max_new_tokens=max_new,
                           sampling=sampling, eos_ids=tuple(eos_ids), pad_id=pad_id,
                           vocab_size=vocab_size)
      return answer_rows(prompt, lengths, answer, eos_ids=eos_ids, pad_id=pad_id,
                         length=batch["input_ids"].shape[1])

    def replay(params, untrained, buffer, batch, key):
      # imitkd, and distillm's heads: with drawn_rows == batch size, mix_rows replaces every
      # row (row i <- drawn row i), which is the official `replay_buffer.sample()` batch
      generate_key, draw_key = jax.random.split(key)
      buffer = push(buffer, answers(params, untrained, batch, generate_key))
      return buffer, mix_rows(batch, draw(buffer, draw_key, self.drawn_rows))

    def gkd(params, untrained, batch, key):
      return mix_rows(batch, answers(params, untrained, batch, key))

    self._replay = jax.jit(replay, donate_argnums=(2,))
    self._gkd = jax.jit(gkd)

  @property
  def sampler(self) -> Any:
    """The jitted program of an on-policy step: gkd's `(params, untrained, batch, key) ->
    batch`, or the replay modes' `(params, untrained, buffer, batch, key) -> (buffer, batch)`."""
    return self._gkd if self.config.mix == "gkd" else self._replay

  def _key(self, state: TrainState, step: int) -> Array:
    return jax.random.fold_in(jax.random.fold_in(state.key, ONPOLICY_STREAM), step)

  def coin(self, step: int) -> bool:
    """Whether step `step` of a gkd or distillm run is on-policy: heads with probability
    `ratio`, a function of the seed and the step alone (the same on every process, and on
    resume)."""
    seed = self.seed & 0xFFFFFFFF  # numpy seeds are non-negative; JAX's may be negative
    return bool(np.random.default_rng([seed, ONPOLICY_STREAM, step]).random()
                < self.config.ratio)

  def __call__(self, state: TrainState, batch: Batch, step: int) -> tuple[TrainState, Batch]:
    if batch["input_ids"].shape[1] != self.max_length:
      raise ValueError(f"on-policy rows need batches of data.max_length={self.max_length} "
                       f"tokens, got {batch['input_ids'].shape[1]}")
    mix = self.config.mix
    if mix in ("gkd", "distillm") and not self.coin(step):
      return state, batch
    key = self._key(state, step)
    if mix == "gkd":
      return state, self._gkd(state.params, state.untrained, batch, key)
    replay, batch = self._replay(state.params, state.untrained, state.replay, batch, key)
    return state.replace(replay=replay), batch


def build(config: Any, student_graphdef: nnx.GraphDef, tokenizer: Any | None,
          pad_id: int, vocab_size: int) -> OnPolicy | None:
  """The run's on-policy driver, or None when `onpolicy.ratio` is 0. The student samples
  from the `vocab_size` tokens both models have; an answer ends at its first stop id
  (`csd_jax.data.chat.stop_ids`: the tokenizer's eos and chat end-of-turn token, the eos ids
  of the student's and teacher's config.json / generation_config.json), which it keeps as
  its last target, as a chat data row ends with its end-of-turn token."""
  if not config.onpolicy.ratio:
    return None
  eos_ids = stop_ids(tokenizer, extra=run_model_stop_ids(config))
  return OnPolicy(config.onpolicy, student_graphdef=student_graphdef,
                  batch_size=config.train.batch_size, max_length=config.data.max_length,
                  max_prompt_length=config.data.max_prompt_length, eos_ids=eos_ids,
                  pad_id=pad_id, seed=config.train.seed, vocab_size=vocab_size)
