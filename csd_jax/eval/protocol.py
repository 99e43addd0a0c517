"""Evaluation protocols: the settings `csd-jax eval` starts from before the command line's.

- `minillm` (the default): the official MiniLLM / DistiLLM / CSD evaluation, as its scripts
  run it (`scripts/*/eval/eval_main_*.sh`, `evaluate.py`, `data_utils/prompt_datasets.py`):
  each prompt's FIRST 256 tokens (`data[:prompt_length]`), encoded with the tokenizer's special
  tokens (`tokenizer.encode(prompt)`: LLaMA's BOS, nothing for GPT-2), left-padded to 256, so
  every prompt gets 512 - 256 = 256 new tokens; sampling at temperature 1, top-p 1, top-k 0
  with `no_repeat_ngram_size` 6 (the scripts do not pass `--no-repeat-ngram-size`: its
  argparse default, 6, applies); seeds 10, 20, 30, 40, 50; the MiniLLM prompt template.
- `run`: a run judged on its own terms: its template and lengths, prompts cut from the left
  (their end kept, as training cuts them), no special tokens (as training encodes them),
  `max_length - width` new tokens for a prompt bucket of width w, no n-gram blocking.

A `--workdir` run keeps its own template under either protocol (a chat-trained student is
prompted with its chat template, which writes its own BOS: no special tokens are added to it);
everything else follows the protocol unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csd_jax.errors import UserError

OFFICIAL_SEEDS = (10, 20, 30, 40, 50)

PROTOCOLS: dict[str, dict[str, Any]] = {
    "minillm": {"template": "minillm", "max_prompt_length": 256, "max_length": 512,
                "max_new_tokens": 256, "keep_prompt": "start", "prompt_special_tokens": True,
                "no_repeat_ngram_size": 6, "seeds": OFFICIAL_SEEDS},
    "run": {"template": "minillm", "max_prompt_length": 256, "max_length": 512,
            "max_new_tokens": None, "keep_prompt": "end", "prompt_special_tokens": False,
            "no_repeat_ngram_size": 0, "seeds": OFFICIAL_SEEDS},
}
# What a run's own config sets under each protocol (its data section, its stop ids).
RUN_KEYS = {"minillm": ("template",), "run": ("template", "max_prompt_length", "max_length")}


def protocol_settings(name: str, run: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The settings of protocol `name`, with the run's own (`run`: its template, lengths and
  stop ids, or None for a bare model directory) where the protocol takes them from the run."""
  if name not in PROTOCOLS:
    raise UserError(f"--protocol {name!r}: valid: {', '.join(PROTOCOLS)}")
  settings = dict(PROTOCOLS[name])
  if run is not None:
    settings.update({k: run[k] for k in RUN_KEYS[name] if k in run})
    if "stop_ids" in run:
      settings["stop_ids"] = run["stop_ids"]
  return settings
