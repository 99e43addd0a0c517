"""Teacher and student on one mesh, the optimizer, and the train state they form.

The teacher is frozen: loaded in its compute dtype (bf16 by default), never given optimizer
state, never checkpointed. The student keeps float32 master weights (`param_dtype`) and computes
in `dtype`. The optimizer is AdamW with decoupled weight decay masked off biases, norms (every
1-D parameter), a warm-up + cosine / linear / constant schedule and
global-norm clipping.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from csd_jax.config import Config, ModelSpec, OptimConfig
from csd_jax.models import CausalLM, init_random, load_pretrained

logger = logging.getLogger("csd_jax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(spec: ModelSpec, mesh: Mesh, *, frozen: bool, **options: Any) -> CausalLM:
  """A model from a path / hub id or a random-init config, born sharded over `mesh`;
  `options` are `ModelConfig` overrides (LoRA)."""
  dtype = DTYPES[spec.dtype]
  param_dtype = dtype if frozen else DTYPES[spec.param_dtype]
  options = {"remat": spec.remat, "attention_impl": spec.attention_impl, **options}
  if spec.path is not None:
    return load_pretrained(spec.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **options)
  return init_random(spec.config, seed=spec.seed, dtype=dtype, param_dtype=param_dtype,
                     mesh=mesh, **options)


def common_vocab_size(teacher: CausalLM, student: CausalLM) -> int:
  """The vocabulary both heads cover. Different sizes (padded embedding rows, e.g. Qwen2.5's
  151936 vs 152064) are cut to the smaller, with a warning; the tokenizer is the same."""
  v_t, v_s = teacher.cfg.vocab_size, student.cfg.vocab_size
  if v_t != v_s:
    logger.warning("teacher vocabulary %d and student vocabulary %d differ: both heads are cut "
                   "to the first %d entries (padded rows); the tokenizer must be the same",
                   v_t, v_s, min(v_t, v_s))
  return min(v_t, v_s)


def check_same_tokenizer(teacher_dir: str | None, student_dir: str | None) -> None:
  """Refuse a teacher and a student whose tokenizers differ (token ids would not match)."""
  if teacher_dir is None or student_dir is None:
    return
  import transformers

  def vocab(directory: str) -> dict[str, int] | None:
    try:
      return transformers.AutoTokenizer.from_pretrained(directory).get_vocab()
    except (OSError, ValueError):
      return None  # no tokenizer files: nothing to compare

  teacher_vocab, student_vocab = vocab(teacher_dir), vocab(student_dir)
  if teacher_vocab is None or student_vocab is None:
    return
  common = set(teacher_vocab) & set(student_vocab)
  differ = sum(teacher_vocab[t] != student_vocab[t] for t in common)
  if differ or len(common) < 0.99 * min(len(teacher_vocab), len(student_vocab)):
    raise ValueError(f"teacher ({teacher_dir}) and student ({student_dir}) use different "
                     f"tokenizers ({differ} shared tokens map to other ids); distillation needs "
                     "one tokenizer: pick a student of the teacher's family")


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine / linear decay to `end_lr`, or constant."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
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


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                  optax.Schedule]:
  schedule = learning_rate_schedule(optim, total_steps)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts), schedule


@dataclasses.dataclass
class Models:
  """The frozen teacher and the trained student, split for the jitted step."""

  teacher: CausalLM
  student: CausalLM
  vocab_size: int  # the vocabulary both heads are cut to


def build_models_student_only(config: Config, mesh: Mesh) -> CausalLM:
  """The student as the run trains it (with its LoRA adapters, if any)."""
  lora = config.lora
  adapters = ({"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
               "lora_targets": tuple(lora.targets)} if lora.rank > 0 else {})
  return build_model(config.student, mesh, frozen=False, **adapters)


def build_models(config: Config, mesh: Mesh) -> Models:
  check_same_tokenizer(config.teacher.path, config.student.path)
  teacher = build_model(config.teacher, mesh, frozen=True)
  student = build_models_student_only(config, mesh)
  return Models(teacher, student, common_vocab_size(teacher, student))


def trainable_filter(config: Config) -> Any:
  """The NNX filter of the student's trained parameters: LoRA parameters under LoRA."""
  from csd_jax.models.lora import LoraParam

  return LoraParam if config.lora.rank > 0 else nnx.Param


def count_params(state: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(state))


def model_flops_per_token(model: CausalLM, seq_len: int, *, backward: bool) -> float:
  """Matmul FLOPs per token of a forward (x3 with the backward) pass: every parameter that
  multiplies (the LM head included, the embedding lookup and learned positions not) plus
  attention's scores and values."""
  from csd_jax.metrics import transformer_flops_per_token

  cfg = model.cfg
  matmul = count_params(nnx.state(model, nnx.Param))
  if not cfg.tie_word_embeddings:
    matmul -= cfg.vocab_size * cfg.hidden_size  # the lookup table; the head is counted
  if model.pos_embed is not None:
    matmul -= model.pos_embed.get_value().size
  return transformer_flops_per_token(matmul, cfg.num_layers, seq_len,
                                     cfg.num_heads * cfg.head_dim, backward=backward)
