"""A run's inputs: train / eval / LM-text loaders from the config, and the tokenizer.

`synthetic` data is random token sequences of `data.max_length` (every position a target),
for smoke tests and benchmarks; `files` and `dolly` are instruction data through the TFDS
builders and the Grain loader, tokenised with the run's tokenizer; `pairs` is chat pairs (a
prompt with the teacher's and the student's response, `csd_jax.data.pairs`), two rows a pair,
kept together in a batch.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
from jax.sharding import Mesh

from csd_jax.config import Config
from csd_jax.errors import UserError
from csd_jax.runtime.sharding import batch_sharding, resolve_rules

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


def instruction_splits(config: Config) -> dict[str, Any]:
  """The run's instruction data as TFDS sources: `train` and, where the source has one, `valid`
  (data.eval_files; MiniLLM's first data.minillm_dev_num records; Dolly's re-split)."""
  from csd_jax.data import tfds_builder

  data = config.data
  data_dir = pathlib.Path(data.data_dir).expanduser()
  if data.source == "minillm":
    return tfds_builder.minillm_dolly(data_dir, data.minillm_dolly, data.minillm_dev_num)
  if data.source == "dolly":
    splits = tfds_builder.dolly(data_dir, source=data.dolly_source)
    return {"train": splits["train"], "valid": splits["valid"]}
  sources = {"train": data.train_files, **({"validation": data.eval_files}
                                            if data.eval_files else {})}
  build = tfds_builder.pair_files if data.source == "pairs" else tfds_builder.instruction_files
  splits = build(sources, data_dir)
  return {"train": splits["train"], **({"valid": splits["validation"]}
                                       if "validation" in splits else {})}


def validation_records(config: Config, limit: int | None = None) -> list[dict[str, Any]]:
  """The first `limit` records of the run's validation split (model selection), in file order:
  data.eval_files, MiniLLM's first data.minillm_dev_num records of raw.jsonl, or (dolly) the
  re-split's validation records."""
  from csd_jax.data import minillm
  from csd_jax.data.instruct import load_records

  data = config.data
  if data.source == "files" and data.eval_files:
    records = [r for path in data.eval_files for r in load_records(path)]
  elif data.source == "pairs" and data.eval_files:   # the prompt, the teacher's as reference
    from csd_jax.data.pairs import pair_record, validation_record
    from csd_jax.data.records import read_json_records

    records = [validation_record(pair_record(r)) for path in data.eval_files
               for _, r in read_json_records(path)]
  elif data.source == "minillm":
    pool = minillm.dolly_pool(data.minillm_dolly, data.minillm_dev_num)
    records = load_records(pool)[:data.minillm_dev_num]
  elif data.source == "dolly":
    source = instruction_splits(config)["valid"]
    records = [{k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
               for i in range(len(source))]
  else:
    raise UserError("eval.datasets names split:valid, but the run has no validation split: set "
                    "data.eval_files (data.source files or pairs), or use data.source minillm / "
                    "dolly")
  return records[:limit] if limit else records


def build_inputs(config: Config, mesh: Mesh, vocab_size: int, tokenizer: Any | None) -> Inputs:
  """Loaders for training, held-out evaluation and (with `loss.lm_coef`) pre-training text,
  tokenised with `tokenizer` (the run's: `csd_jax.run.models.resolve_tokenizer`; unused by synthetic
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
  splits = instruction_splits(config)
  train_source, eval_source = splits["train"], splits.get("valid")
  lengths = {"template": data.template, "max_length": data.max_length,
             "max_prompt_length": data.max_prompt_length, "keep_prompt": data.keep_prompt}
  if data.source == "pairs":   # a record is two rows, the teacher's response and the student's
    from csd_jax.data.pairs import PairTokenizer

    encode = PairTokenizer(tokenizer, **lengths)
  else:
    encode = InstructionTokenizer(tokenizer, **lengths)
  lm = None
  if config.loss.lm_coef:
    from csd_jax.data.token_files import ChunkEncoder, TokenChunks, is_token_file

    token_files = [p for p in data.lm_files if is_token_file(p)]
    if token_files and len(token_files) < len(data.lm_files):
      text_files = [p for p in data.lm_files if not is_token_file(p)]
      raise UserError(f"data.lm_files mixes token files ({token_files[0]}) and text files "
                      f"({text_files[0]}); use one kind: convert the text with "
                      "csd_jax.data.token_files.convert_texts, or list only text files")
    if token_files:  # MiniLLM's pre-tokenised chunks (processed_data/openwebtext/...)
      lm = loader(TokenChunks(token_files), ChunkEncoder(data.max_length, vocab_size),
                  encode.pad_id, 2)
    else:
      text = tfds_builder.text_files({"train": data.lm_files}, data_dir)["train"]
      lm = loader(text, TextTokenizer(tokenizer, max_length=data.max_length), encode.pad_id, 2)
  evaluation = (loader(eval_source, encode, encode.pad_id, 1, False)
                if eval_source is not None else None)
  return Inputs(loader(train_source, encode, encode.pad_id), evaluation, lm, tokenizer,
                encode.pad_id)
