"""A run's programs, built from its config over a TPU slice's chips and lowered on abstract values.

    programs = lower_programs(config, slice_devices(SLICES["v5e-8"]))
    programs.lowered["train_step"].compile()    # the real TPU compiler, no chip needed

What is lowered is what `csd-jax train` runs: the mesh from `mesh.*` over the slice's chips, the
teacher and student of the config's shapes born sharded by the rules table, the train state as
`init_train_state` places it (the optimizer state where its jitted init puts it), the train step
of `make_steps` (grad_accum, LoRA, remat, the fused loss or not), the held-out eval step, and for
on-policy runs the sampler with its KV cache. No weight, checkpoint or data file is read: a
model's shapes come from its `config` dict, the `config.json` of a local directory or of the
hub cache, the architectures csd-jax knows by hub id, or the hub id its `like` names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from csd_jax.config import Config, ModelSpec
from csd_jax.errors import UserError
from csd_jax.models.io import architectures, hub
from csd_jax.models.io.hf import abstract_model
from csd_jax.run.models import (Models, common_vocab_size, model_settings, student_adapters)
from csd_jax.run.state import (ROW_KEYS, abstract_train_state, initial_replay, make_optimizer,
                               trainable_filter)
from csd_jax.runtime.sharding import batch_sharding, make_mesh, resolve_rules
from csd_jax.train import onpolicy as onpolicy_lib
from csd_jax.train.loop import check_batch_split, make_steps


@dataclasses.dataclass
class Programs:
  """A run's lowered programs and the per-chip bytes of their inputs, by part."""

  mesh: Mesh
  lowered: dict[str, Any]        # name -> jax.stages.Lowered
  parts: dict[str, int]          # per chip: teacher weights, student, optimizer state, ...
  tokens_per_step: int           # tokens of one optimizer step's batch


# ---- model shapes ------------------------------------------------------------------------------

def model_architecture(spec: ModelSpec, role: str) -> dict[str, Any]:
  """The transformers config (shapes) of a teacher or student, without its weights.

  Raises:
    UserError: no config found (names what to set: `like`, or a reachable path).
  """
  if spec.config is not None:
    return dict(spec.config)
  local = pathlib.Path(spec.path) / "config.json"
  if local.is_file():
    return json.loads(local.read_text())
  if (cached := hub.cached_file(spec.path, "config.json")) is not None:
    return json.loads(cached.read_text())
  for name in (spec.path, spec.like):
    if name and (known := architectures.architecture(name)) is not None:
      return dict(known)
  if spec.like:
    return json.loads((hub.resolve(spec.like, weights=False) / "config.json").read_text())
  if hub.parse_hub_id(spec.path) is not None and not pathlib.Path(spec.path).exists():
    return json.loads((hub.resolve(spec.path, weights=False) / "config.json").read_text())
  raise UserError(f"{role}.path={spec.path}: no config.json there to take the model's shapes "
                  f"from; set {role}.like to the hub id of its architecture (e.g. "
                  "google/gemma-7b-it for an SFT export of it)")


def abstract_models(config: Config, mesh: Mesh) -> Models:
  """Teacher and student of the run's shapes, as `ShapeDtypeStruct`s sharded over `mesh`."""
  rules = resolve_rules(config.mesh.rules)

  def build(spec: ModelSpec, role: str, trainable: bool, **options: Any) -> Any:
    dtype, param_dtype, options = model_settings(spec, trainable=trainable, **options)
    return abstract_model(model_architecture(spec, role), dtype=dtype, param_dtype=param_dtype,
                          mesh=mesh, rules=rules, **options)

  teacher = (None if config.teacher is None
             else build(config.teacher, "teacher", trainable=False))
  student = build(config.student, "student", trainable=True, **student_adapters(config))
  vocab = (student.cfg.vocab_size if teacher is None
           else common_vocab_size(teacher, student))
  return Models(teacher, student, vocab)


# ---- abstract inputs ---------------------------------------------------------------------------

def abstract_batch(config: Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """One global batch of the run's shape ([batch_size, max_length] int32 fields; chat pairs
  add their `pair_role`), sharded as the loader shards it."""
  keys = ROW_KEYS + (("pair_role",) if config.data.source == "pairs" else ())
  sharding = batch_sharding(mesh, resolve_rules(config.mesh.rules))
  shape = (config.train.batch_size, config.data.max_length)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in keys}


def per_chip_bytes(tree: Any) -> int:
  """Bytes of the largest shard of each leaf of an abstract tree, summed: one chip's share."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue   # a few bytes
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def _stop_ids(model: Any) -> tuple[int, ...]:
  eos = model.cfg.eos_token_id
  ids = eos if isinstance(eos, (list, tuple)) else [eos]
  return tuple(i for i in ids if i is not None) or (0,)


# ---- the programs ------------------------------------------------------------------------------

def lower_programs(config: Config, devices: Sequence[Any]) -> Programs:
  """Every program `csd-jax train` would run for `config`, lowered over `devices`.

  Raises:
    UserError: the mesh does not divide the devices, or the batch does not split over it.
  """
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  check_batch_split(config, mesh)
  models = abstract_models(config, mesh)
  optimizer, _ = make_optimizer(config.optim, max(config.train.steps, 1))
  replay = initial_replay(config)
  graphdef, state = abstract_train_state(
      models.student, optimizer, mesh, trainable=trainable_filter(config.lora),
      replay=None if replay is None else jax.eval_shape(lambda: replay))
  teacher_graphdef, teacher_state = (nnx.split(models.teacher) if models.teacher is not None
                                     else (None, None))
  train_step, eval_step = make_steps(config, graphdef, teacher_graphdef,
                                     jax.tree.map(lambda x: x.sharding, state),
                                     max(config.train.steps, 1), models.vocab_size)
  batch = abstract_batch(config, mesh)
  lm_batch = (batch if config.loss.lm_coef and config.data.lm_files else None)
  with jax.set_mesh(mesh):
    lowered = {"train_step": train_step.lower(state, teacher_state, batch, lm_batch),
               "eval_step": eval_step.lower(state, teacher_state, batch)}
    if config.onpolicy.ratio:
      sampler = onpolicy_lib.OnPolicy(
          config.onpolicy, student_graphdef=graphdef, batch_size=config.train.batch_size,
          max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
          eos_ids=_stop_ids(models.student), pad_id=0, seed=config.train.seed,
          vocab_size=models.vocab_size).sampler
      key = jax.ShapeDtypeStruct(state.key.shape, state.key.dtype,
                                 sharding=NamedSharding(mesh, P()))
      buffers = () if state.replay is None else (state.replay,)
      lowered["sampler"] = sampler.lower(state.params, state.untrained, *buffers, batch, key)
  parts = {"teacher weights": per_chip_bytes(teacher_state) if teacher_state is not None else 0,
           "student parameters": per_chip_bytes((state.params, state.untrained)),
           "optimizer state": per_chip_bytes(state.opt_state),
           "batch": per_chip_bytes(batch) * (2 if lm_batch is not None else 1)}
  if state.replay is not None:
    parts["replay buffer"] = per_chip_bytes(state.replay)
  return Programs(mesh, lowered, parts, config.train.batch_size * config.data.max_length)
