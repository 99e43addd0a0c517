"""The run configuration's schema: one frozen dataclass per section, each field with its
default, plus the facts the loader checks while it builds them (the valid choices, the
free-form dicts, the renamed keys). `load.py` builds a `Config` from YAML and overrides."""

from __future__ import annotations

import dataclasses
import os

from csd_jax.errors import UserError
from csd_jax.sampling import Sampling


VALIDATION_SPLIT = "split:valid"   # eval.datasets.NAME: the run's own validation split
COMPILE_CACHE_ENV = "CSD_JAX_COMPILE_CACHE"   # train.compile_cache's default, where set


class ConfigError(UserError):
  """A bad config file or override; the message is one line that names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A teacher or student: a Hugging Face directory / hub id, or a transformers config to
  initialise randomly (`config`: a dict with `model_type` and its fields)."""

  path: str | None = None
  config: dict | None = None
  dtype: str = "bfloat16"          # compute dtype
  param_dtype: str = "float32"     # storage; the teacher is cast to `dtype` when frozen
  remat: str = "none"              # none | full | dots
  layer_barrier: bool = True       # FSDP: gather a layer's weights at most one layer ahead
  attention_impl: str | None = None
  seed: int = 0
  dropout: float | None = None     # student: None = its config.json's rates (GPT-2: 0.1); a
                                   # number replaces the embedding, attention and residual rates
  like: str | None = None          # a hub id of this model's architecture: `csd-jax compile`
                                   # takes the shapes from it while `path` does not exist yet


@dataclasses.dataclass(frozen=True)
class LossConfig:
  name: str = "csd"
  params: dict = dataclasses.field(default_factory=dict)  # e.g. {w1: teacher, w2: student}
  kd_coef: float = 1.0
  ce_coef: float = 0.0            # SFT term on the data's responses
  lm_coef: float = 0.0            # LM term on pre-training text (data.lm_files)
  fused: bool = True
  chunk_size: int = 1024
  normalize: str = "token"
  # Chat pairs: (2 - beta) KD(teacher's response) + beta KD(student's); beta from pair_beta to
  # pair_beta_end (null: constant) over the first pair_beta_ramp of the steps (official 1.5, 0.5)
  pair_beta: float = 1.0
  pair_beta_end: float | None = None
  pair_beta_ramp: float = 0.5


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  schedule: str = "cosine"        # cosine | linear | constant
  warmup_steps: int = 0
  warmup_ratio: float = 0.0       # warm-up as a share of the steps (Hugging Face's), if no steps
  end_lr: float = 0.0
  weight_decay: float = 0.01
  clip_norm: float = 1.0          # 0 = no clipping
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 0                  # 0: epochs x steps per epoch
  epochs: float = 1.0
  batch_size: int = 8             # global rows per optimizer step
  grad_accum: int = 1             # micro-batches per step (batch_size divides into them)
  seed: int = 0
  log_every: int = 10
  heldout_every: int = 0          # held-out loss every N steps (0: only at the end)
  heldout_batches: int = 4        # batches of the held-out set per evaluation
  max_nonfinite_steps: int = 3    # skipped non-finite updates in a row before the run stops
  # XLA's persistent cache: workdir (W/xla_cache), a directory, or "" (off). The default is
  # $CSD_JAX_COMPILE_CACHE where that is set: one cache for every run of a machine or a job.
  compile_cache: str = dataclasses.field(
      default_factory=lambda: os.environ.get(COMPILE_CACHE_ENV, "workdir"))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Logical axis -> list of mesh axes (data, fsdp, tensor), overriding sharding.RULES for
  # teacher and student alike, e.g. {vocab: [], mlp: [fsdp, tensor]}.
  rules: dict = dataclasses.field(default_factory=dict)
  slice: str | None = None        # the TPU slice the run is made for (v5e-8, v5p-128, ...):
                                  # what `csd-jax compile` compiles it for by default


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"       # synthetic | files | minillm | dolly | pairs (chat pairs)
  train_files: list = dataclasses.field(default_factory=list)
  eval_files: list = dataclasses.field(default_factory=list)
  lm_files: list = dataclasses.field(default_factory=list)
  minillm_dolly: str | None = None  # minillm: MiniLLM's Dolly directory (raw.jsonl, valid.jsonl)
  minillm_dev_num: int = 1000     # minillm: raw.jsonl's first N records are the validation set
  dolly_source: str = "databricks/databricks-dolly-15k"   # dolly: the hub file, re-split
  data_dir: str = "~/tensorflow_datasets"
  tokenizer: str | None = None    # default: the teacher's directory
  template: str = "minillm"       # minillm | chat | none
  max_length: int = 512
  max_prompt_length: int = 256
  keep_prompt: str = "end"        # a long prompt keeps its end, or its start (DistiLLM / CSD)
  pack: bool = False
  synthetic_samples: int = 256    # synthetic: random token sequences of max_length


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0                   # 0: full fine-tuning
  alpha: float = 16.0
  dropout: float = 0.0
  targets: list = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
  """Student-generated training rows (csd_jax/train/onpolicy.py).

  imitkd: every step the student answers the batch's prompts into a replay buffer, and a share
  `ratio` of the batch's rows is drawn from the buffer. gkd: with probability `ratio` a step's
  whole batch is the student's fresh answers, otherwise the dataset's. distillm (the official
  DistiLLM / CSD `--student-gen` mixing): with probability `ratio` the student answers the
  batch's prompts into the buffer and the whole batch is drawn from the buffer; otherwise the
  dataset's batch, nothing generated.
  """

  ratio: float = 0.0              # 0: off
  mix: str = "imitkd"             # imitkd | gkd | distillm
  buffer_size: int = 1000         # imitkd, distillm: the replay buffer's rows (>= batch_size)
  max_new_tokens: int = 0         # 0: data.max_length - data.max_prompt_length
  sampling: Sampling = dataclasses.field(default_factory=Sampling)  # csd_jax/sampling.py


@dataclasses.dataclass(frozen=True)
class GenEvalConfig:
  """Evaluation by generation during training (csd_jax/eval/generation.py)."""

  every: int = 0                  # 0: never during training (`csd-jax eval` afterwards)
  every_epoch: bool = False       # also after every epoch (the official runs' model selection)
  datasets: dict = dataclasses.field(default_factory=dict)  # name: file, or split:valid (the run's
                                                            # validation split)
  select: str | None = None       # a datasets name: its ROUGE-L keeps the best checkpoint (W/best)
  max_examples: int = 64          # the first N records of each dataset (0: all)
  seeds: list = dataclasses.field(default_factory=lambda: [10])
  batch_size: int = 16
  sampling: Sampling = dataclasses.field(default_factory=Sampling)  # csd_jax/sampling.py


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0                  # 0: only at the end
  keep: int = 3


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases, optional (`pip install 'csd-jax[wandb]'`): process 0 logs the scalars
  TensorBoard gets; a resumed run continues the same W&B run (its id is kept in
  W/wandb_run.json); W&B failing or unreachable never stops training (one warning)."""

  project: str | None = None      # None: W&B off
  entity: str | None = None       # the team or user; None: the API key's default entity
  name: str | None = None         # the run's display name; None: W&B picks one
  tags: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  """Where the metrics go besides W/metrics.jsonl and W/tensorboard/ (always written)."""

  wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass(frozen=True)
class Config:
  # None (`teacher: null`): supervised fine-tuning of the student, no teacher loaded
  teacher: ModelSpec | None = dataclasses.field(default_factory=ModelSpec)
  student: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  onpolicy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
  eval: GenEvalConfig = dataclasses.field(default_factory=GenEvalConfig)
  metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)


CHOICES = {
    "loss.normalize": ("token", "sequence"), "optim.schedule": ("cosine", "linear", "constant"),
    "data.source": ("synthetic", "files", "minillm", "dolly", "pairs"),
    "data.template": ("minillm", "chat", "none"),
    "data.keep_prompt": ("start", "end"),
    "teacher.remat": ("none", "full", "dots"), "student.remat": ("none", "full", "dots"),
    "teacher.dtype": ("float32", "bfloat16", "float16"),
    "student.dtype": ("float32", "bfloat16", "float16"),
    "teacher.param_dtype": ("float32", "bfloat16", "float16"),
    "student.param_dtype": ("float32", "bfloat16", "float16"),
    "onpolicy.mix": ("imitkd", "gkd", "distillm"),
}
# Dict-valued fields: their keys are free (checked by their users), not config keys.
FREE_DICTS = ("loss.params", "teacher.config", "student.config", "eval.datasets", "mesh.rules")


# Keys that were renamed: an old config gets the new name, not a guess.
RENAMED = {"train.eval_every": "train.heldout_every (the held-out loss; eval.every is evaluation "
                               "by generation)",
           "train.eval_batches": "train.heldout_batches"}
