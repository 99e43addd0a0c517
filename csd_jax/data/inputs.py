"""A run's inputs: train / eval / LM-text loaders from the config, and the tokenizer.

`synthetic` data is random token sequences of `data.max_length` (every position a target),
for smoke tests and benchmarks; `files` and `dolly` are instruction data through the TFDS
builders and the Grain loader, tokenised with the run's tokenizer.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
from jax.sharding import Mesh

from csd_jax.config import Config
from csd_jax.errors import UserError
from csd_jax.sharding import batch_sharding, resolve_rules

SYNTHETIC_EVAL_OFFSET = 1 << 20  # eval records' seeds never collide with training records'


@dataclasses.dataclass
class Inputs:
  train: Any
  eval: Any | None
  lm: Any | None
  tokenizer: Any | None
  pad_id: int = 0


class SyntheticTokens:
  """Record {"text": "i"} -> random ids (seeded by i) of length max_length + 1, shifted."""

  def __init__(self, vocab_size: int, max_length: int, seed: int):
    self.vocab_size, self.max_length, self.seed = vocab_size, max_length, seed

  def __call__(self, record: dict[str, str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(record["text"])])
    ids = rng.integers(0, self.vocab_size, self.max_length + 1, dtype=np.int32)
    return {"input_ids": ids[:-1], "labels": ids[1:]}


def build_inputs(config: Config, mesh: Mesh, vocab_size: int, tokenizer: Any | None) -> Inputs:
  """Loaders for training, held-out evaluation and (with `loss.lm_coef`) pre-training text,
  tokenised with `tokenizer` (the run's: `csd_jax.run.resolve_tokenizer`; unused by synthetic
  data)."""
  from csd_jax.data import tfds_builder
  from csd_jax.data.instruct import InstructionTokenizer, TextTokenizer
  from csd_jax.data.loader import BatchLoader, LoaderConfig

  data = config.data
  sharding = batch_sharding(mesh, resolve_rules(config.mesh.rules))

  def loader(source, encode, pad_id, seed_offset=0, shuffle=True):
    # On-policy rows are data.max_length long: the batches they join are too.
    bucket = data.max_length if config.onpolicy.ratio else 64
    cfg = LoaderConfig(global_batch_size=config.train.batch_size, max_length=data.max_length,
                       seed=config.train.seed + seed_offset, shuffle=shuffle, pack=data.pack,
                       bucket_multiple=bucket)
    return BatchLoader(source, encode, pad_id=pad_id, config=cfg, sharding=sharding)

  if data.source == "synthetic":
    encode = SyntheticTokens(vocab_size, data.max_length, config.train.seed)
    train_records = [{"text": str(i)} for i in range(data.synthetic_samples)]
    eval_records = [{"text": str(SYNTHETIC_EVAL_OFFSET + i)}
                    for i in range(config.train.batch_size * config.train.heldout_batches)]
    return Inputs(loader(train_records, encode, 0), loader(eval_records, encode, 0, 1, False),
                  None, None)

  if tokenizer is None:
    raise UserError(f"data.source={data.source} needs a tokenizer: set data.tokenizer or use "
                    "a teacher.path or student.path with tokenizer files")
  data_dir = pathlib.Path(data.data_dir).expanduser()
  if data.source == "dolly":
    splits = tfds_builder.dolly(data_dir, source=data.dolly_source)
    train_source, eval_source = splits["train"], splits["valid"]
  else:
    sources = {"train": data.train_files}
    if data.eval_files:
      sources["validation"] = data.eval_files
    splits = tfds_builder.instruction_files(sources, data_dir)
    train_source, eval_source = splits["train"], splits.get("validation")
  encode = InstructionTokenizer(tokenizer, template=data.template, max_length=data.max_length,
                                max_prompt_length=data.max_prompt_length)
  lm = None
  if config.loss.lm_coef:
    text = tfds_builder.text_files({"train": data.lm_files}, data_dir)["train"]
    lm = loader(text, TextTokenizer(tokenizer, max_length=data.max_length), encode.pad_id, 2)
  evaluation = (loader(eval_source, encode, encode.pad_id, 1, False)
                if eval_source is not None else None)
  return Inputs(loader(train_source, encode, encode.pad_id), evaluation, lm, tokenizer,
                encode.pad_id)
