"""The train state: one typed pytree, built by one function, and the optimizer it holds.

`TrainState` is what the jitted step updates, what Orbax checkpoints (its field names are the
checkpoint's schema) and what export, evaluation and the notebook restore: all of them build it
with `init_train_state`, so a checkpoint written by training always fits what reads it.

The student is split in two: `params`, the variables the optimizer trains (the LoRA adapters
only, under LoRA), and `untrained`, every other variable of the student (the frozen base under
LoRA, RNG counters). The teacher is not in the state: it is frozen, rebuilt from its source and
never checkpointed.

The optimizer is AdamW with decoupled weight decay masked off biases and norms (every 1-D
parameter), a warm-up + cosine / linear / constant schedule and global-norm clipping.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from csd_jax.config import Config, LoraConfig, OptimConfig
from csd_jax.data.fields import IGNORE_INDEX


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes, and a checkpoint holds."""

  params: nnx.State                # the student's trained variables
  untrained: nnx.State             # the student's other variables
  opt_state: optax.OptState
  step: jax.Array                  # int32, optimizer steps done
  key: jax.Array                   # the run's typed PRNG key (dropout, on-policy sampling)
  replay: dict[str, Any] | None = None  # on-policy replay buffer (imitkd, distillm), else None

  def student(self, graphdef: nnx.GraphDef) -> Any:
    """The student model with this state's variables."""
    return nnx.merge(graphdef, self.params, self.untrained)


# The on-policy replay buffer's rows (csd_jax.train.onpolicy fills it): a ring of data rows,
# part of the train state and so of the checkpoint's schema.
ROW_KEYS = ("input_ids", "labels", "attention_mask", "positions")


def empty_replay(size: int, length: int, pad_id: int) -> dict[str, Any]:
  """An empty replay buffer of `size` rows of `length` tokens."""
  fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "positions": 0}
  return {"rows": {k: jnp.full((size, length), fill[k], jnp.int32) for k in ROW_KEYS},
          "filled": jnp.zeros((), jnp.int32), "cursor": jnp.zeros((), jnp.int32)}


def initial_replay(config: Config, pad_id: int = 0) -> dict[str, Any] | None:
  """The empty replay buffer a run's train state holds (and its checkpoints), or None when
  the run has none (no on-policy data, or gkd, which trains on fresh answers only)."""
  if not config.onpolicy.ratio or config.onpolicy.mix not in ("imitkd", "distillm"):
    return None
  return empty_replay(config.onpolicy.buffer_size, config.data.max_length, pad_id)


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of `tree` is finite (a bool scalar, on the device)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else (
      jnp.array(True))


def trainable_filter(lora: LoraConfig) -> Any:
  """The NNX filter of the student's trained variables: the LoRA adapters under LoRA."""
  from csd_jax.models.lora import LoraParam

  return LoraParam if lora.rank > 0 else nnx.Param


def _commit(tree: Any, mesh: Mesh) -> Any:
  """Every leaf committed to a NamedSharding of `mesh` (a 1-device mesh hands out uncommitted
  single-device arrays, whose first jitted step would otherwise compile twice)."""
  def commit(x):
    return x if isinstance(x.sharding, NamedSharding) else jax.device_put(
        x, NamedSharding(mesh, P()))

  return jax.tree.map(commit, tree)


def replicated(mesh: Mesh, value: Any) -> jax.Array:
  """A host value replicated on every device of the mesh (of every process)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda _: value)


def init_train_state(student: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                     trainable: Any = nnx.Param, seed: int = 0,
                     replay: dict[str, Any] | None = None) -> tuple[nnx.GraphDef, TrainState]:
  """The student's graph and its fresh train state, every leaf sharded on `mesh`.

  The student's variables keep the shardings they were born with; the optimizer state follows
  the parameters'; the step, the key and the replay buffer are replicated.
  """
  graphdef, params, untrained = nnx.split(student, trainable, ...)
  key = jax.random.wrap_key_data(replicated(mesh, jax.random.key_data(jax.random.key(seed))))
  if replay is not None:
    replay = jax.tree.map(lambda x: replicated(mesh, x), replay)
  state = TrainState(params=params, untrained=untrained,
                     opt_state=jax.jit(optimizer.init, out_shardings=optimizer_shardings(
                         optimizer, params, mesh))(params),
                     step=replicated(mesh, np.int32(0)), key=key, replay=replay)
  return graphdef, _commit(state, mesh)


def optimizer_shardings(optimizer: optax.GradientTransformation, params: nnx.State,
                        mesh: Mesh) -> Any:
  """Where the optimizer state lives: each leaf that mirrors a parameter (Adam's moments) is
  sharded like that parameter, the rest (step counts) replicated. Left to XLA, the zeros that
  `optimizer.init` returns come back replicated: every chip would hold the whole float32
  moments."""
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params),
      jax.tree.map(lambda p: p.sharding, params),
      transform_non_params=lambda _: NamedSharding(mesh, P()))


def abstract_train_state(student: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                         trainable: Any = nnx.Param, replay: dict[str, Any] | None = None
                         ) -> tuple[nnx.GraphDef, TrainState]:
  """`init_train_state` without allocating: the student's graph and a `TrainState` of
  `jax.ShapeDtypeStruct`s with the shardings training gives each leaf. `student` is an
  abstract model (`csd_jax.models.io.hf.abstract_model`); `replay` the replay buffer's shapes
  (`jax.eval_shape` of `initial_replay`) or None."""
  graphdef, params, untrained = nnx.split(student, trainable, ...)
  everywhere = NamedSharding(mesh, P())
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           jax.eval_shape(optimizer.init, params),
                           optimizer_shardings(optimizer, params, mesh))

  def replicated_abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere),
                        tree)

  state = TrainState(params=params, untrained=untrained, opt_state=opt_state,
                     step=replicated_abstract(jax.ShapeDtypeStruct((), jnp.int32)),
                     key=replicated_abstract(jax.eval_shape(lambda: jax.random.key(0))),
                     replay=None if replay is None else replicated_abstract(replay))
  return graphdef, state


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 (`warmup_steps`, else `ceil(warmup_ratio x total_steps)` as Hugging
  Face's trainer counts it), then cosine / linear decay to `end_lr`, or constant."""
  warmup = optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)
  warmup = min(warmup, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr / optim.lr)
  elif optim.schedule == "linear":
    decay = optax.linear_schedule(optim.lr, optim.end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(optim.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def weight_decay_mask(params: nnx.State) -> nnx.State:
  """True where weight decay applies: matrices; not biases or norm scales (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: OptimConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (masked weight decay, clipping) over `total_steps`, and its learning-rate schedule."""
  schedule = learning_rate_schedule(optim, total_steps)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule
