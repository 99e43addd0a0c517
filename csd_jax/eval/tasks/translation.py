"""Translation BLEU / chrF (and COMET) as the official `eval/eval_mt.py` computes them
(aailab-kaist/CSD `task_specific_distillation/eval/eval_mt.py`; google-research
`speculative_kd/eval/eval_mt.py`).

- Prompt: the record's `instruction` as the user's turn of the chat template (speculative_kd's
  mt_*.json: "Translate Assamese sentence into English. This is the Assamese sentence: {src}
  Here is the English translation:").
- Decoding: greedy, up to 256 new tokens, cut at the first line break (vLLM's `stop=['\\n']`).
- BLEU: sacrebleu's corpus BLEU with its defaults (13a tokenisation, exponential smoothing,
  case-sensitive), what Hugging Face `evaluate.load('sacrebleu')` computes in the CSD script.
  chrF: sacrebleu's corpus chrF with its defaults (chrF2, character 6-grams, no word n-grams),
  which the official scripts do not compute. Both 0-100; their sacrebleu signatures are kept.
- COMET (the official's second metric, Unbabel/wmt22-comet-da): only with `comet_model`, the
  path of a COMET checkpoint already on disk (`.../checkpoints/model.ckpt`) and the
  `unbabel-comet` package; it is never downloaded. Otherwise the results say "not computed".
  Its source sentence is the record's `source` / `src` field, else the sentence the official
  prompt wraps ("This is the ... sentence: {src} Here is the ... translation:"). The score is
  COMET's system score as it reports it (about 0-1, not x 100).

Files: JSONL / JSON / Parquet of instruction / response records (speculative_kd's mt_1k_*.json
and mt_test.json as `{"instances": [...]}`); several references per example are allowed when
every example has as many.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from csd_jax.data.instruct import records_from_json
from csd_jax.errors import UserError
from csd_jax.eval.tasks import Example, read_examples

NAME = "translation"
COLUMNS = ("bleu", "chrf", "comet")
MAX_NEW_TOKENS = 256
MAX_PROMPT_LENGTH = 256   # the official training's input length (kd_train_mt.yaml)
STOP_STRINGS = ("\n",)
NOT_COMPUTED = "not computed"
# The official prompt around the source sentence (eval_mt.py splits on its Assamese form).
_WRAPPED_SOURCE = re.compile(r"This is the [^.]*? sentence: (.*?) Here is the [^.]*? translation:",
                             re.DOTALL)


def source_sentence(raw: Mapping[str, Any], instruction: str) -> str | None:
  """The sentence to translate: a `source` / `src` field, else the one the official prompt wraps."""
  for name in ("source", "src"):
    if isinstance(raw.get(name), str):
      return raw[name]
  match = _WRAPPED_SOURCE.search(instruction)
  return match.group(1) if match else None


def _example(_: Any, raw: Mapping[str, Any]) -> Example:
  record = records_from_json(raw)
  return Example(record={"instruction": record["instruction"],
                         "context": record.get("context") or ""},
                 references=tuple(record.get("references") or [record["response"]]),
                 source=source_sentence(raw, record["instruction"]))


def read(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
  """The examples of a translation file (the first `limit`)."""
  return read_examples(path, limit, _example, "instruction / response records")


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
  """sacrebleu's layout: one stream per reference position, each covering every example."""
  counts = {len(refs) for refs in references}
  if len(counts) != 1:
    raise UserError(f"translation references: the examples have {sorted(counts)} references "
                    "each; BLEU needs as many for every example: give each the same number")
  return [list(stream) for stream in zip(*references)]


def bleu_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]
              ) -> dict[str, Any]:
  """Corpus BLEU and chrF (sacrebleu's defaults) and their signatures."""
  from sacrebleu.metrics import BLEU, CHRF

  streams = _reference_streams(references)
  bleu, chrf = BLEU(), CHRF()
  return {"bleu": float(bleu.corpus_score(list(predictions), streams).score),
          "chrf": float(chrf.corpus_score(list(predictions), streams).score),
          "bleu_signature": str(bleu.get_signature()),
          "chrf_signature": str(chrf.get_signature())}


def check_comet_model(model_path: str | os.PathLike) -> pathlib.Path:
  """The COMET checkpoint's path, once it is known to exist and the package to import (checked
  before any generation, so that a typo costs no decoding)."""
  path = pathlib.Path(model_path).expanduser()
  if not path.is_file():
    raise UserError(f"--comet-model {model_path}: no such file; pass the checkpoints/model.ckpt "
                    "of a COMET model already downloaded (e.g. Unbabel/wmt22-comet-da)")
  if importlib.util.find_spec("comet") is None:
    raise UserError("--comet-model needs the COMET package: pip install unbabel-comet")
  return path


def comet_score(sources: Sequence[str], predictions: Sequence[str], references: Sequence[str],
                model_path: str | os.PathLike) -> float:
  """COMET's system score of a local checkpoint (never downloaded)."""
  path = check_comet_model(model_path)
  import torch
  from comet import load_from_checkpoint

  offline = ({"local_files_only": True}
             if "local_files_only" in inspect.signature(load_from_checkpoint).parameters else {})
  model = load_from_checkpoint(str(path), **offline)
  data = [{"src": s, "mt": m, "ref": r} for s, m, r in zip(sources, predictions, references)]
  output = model.predict(data, batch_size=8, gpus=1 if torch.cuda.is_available() else 0,
                         progress_bar=False)
  return float(output.system_score)


def score(examples: Sequence[Example], prompts: Sequence[str], outputs: Sequence[str], *,
          comet_model: str | None = None, **_: Any) -> dict[str, Any]:
  """BLEU, chrF, COMET (or "not computed") and the per-example records."""
  metrics = bleu_chrf(outputs, [e.references for e in examples])
  metrics["comet"] = NOT_COMPUTED
  if comet_model:
    missing = [i for i, e in enumerate(examples) if e.source is None]
    if missing:
      raise UserError(f"--comet-model: example {missing[0]} has no source sentence; give "
                      "each record a 'source' field (or the official prompt around it)")
    metrics["comet"] = comet_score([e.source for e in examples], outputs,
                                   [e.references[0] for e in examples], comet_model)
  records = [{"prompt": prompt, "output": output, "references": list(example.references),
              "source": example.source}
             for example, prompt, output in zip(examples, prompts, outputs, strict=True)]
  return {**metrics, "records": records}
