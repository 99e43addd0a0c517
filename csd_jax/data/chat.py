"""Chat turns and stop tokens: where an assistant turn ends, and which tokens end a generation.

`end_of_turn(tokenizer)` is the token a chat template writes right after an assistant's message
(`<|im_end|>` for ChatML: Qwen, SmolLM2; `<end_of_turn>` for Gemma; `<|eot_id|>` for Llama 3),
found by rendering a one-turn conversation, not from a table of names.
`chat_response(tokenizer, user, response)` is a response as the template writes it after the
generation prompt, up to and including that token (the text the template writes after it, e.g.
Qwen's and Gemma's newline, is the next turn's business: generation stops at the token, so
neither the model nor an on-policy row ever holds it).
`stop_ids(tokenizer, *models)` gathers every id that ends a generation: the tokenizer's eos, the
chat template's end-of-turn token (or a known one the vocabulary has), and the `eos_token_id`
(an int or a list) of each model's config.json and generation_config.json.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from csd_jax.runtime import paths

logger = logging.getLogger("csd_jax.data")

# End-of-turn tokens of well-known chat formats: stops too when a vocabulary has them as added
# tokens, even where the tokenizer carries no chat template (a base model's).
KNOWN_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
_PROBE = "csdjaxprobe"   # an assistant message that no template rewrites (no spaces to trim)


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _added_vocab(tokenizer: Any) -> Mapping[str, int]:
  try:
    return tokenizer.get_added_vocab()
  except (AttributeError, NotImplementedError):
    return {}


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                add_generation_prompt: bool = False) -> str:
  """The chat template's text for `messages` (not tokenised)."""
  return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                       tokenize=False)


def end_of_turn(tokenizer: Any) -> tuple[str, int] | None:
  """(token, id) that the tokenizer's chat template writes right after an assistant's message,
  or None: no chat template, a template that refuses a one-turn conversation, or one that
  writes no special token there."""
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    return None
  try:
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi."},
                                   {"role": "assistant", "content": _PROBE}])
  except Exception as error:  # noqa: BLE001 (jinja's TemplateError, a template's raise_exception)
    logger.warning("the chat template does not render a one-turn conversation (%s: %s): no "
                   "end-of-turn token", type(error).__name__, error)
    return None
  if _PROBE not in text:
    return None
  tail = text[text.rindex(_PROBE) + len(_PROBE):].lstrip()
  ids = _encode(tokenizer, tail) if tail else []
  if not ids:
    return None
  token = tokenizer.convert_ids_to_tokens(ids[0])
  special = set(getattr(tokenizer, "all_special_ids", ()) or ())
  if token not in _added_vocab(tokenizer) and ids[0] not in special:
    return None   # the template ends a turn with plain text: no token to stop at
  return token, int(ids[0])


def chat_response(tokenizer: Any, user: str | Sequence[Mapping[str, str]], response: str, *,
                  end: tuple[str, int] | None = None, with_end: bool = True) -> str:
  """`response` as the chat template writes it after the generation prompt of `user`'s turn
  (or of a conversation: `user` a list of messages), up to and including its end-of-turn token
  `end` (default: `end_of_turn(tokenizer)`); `with_end=False`: up to it, not including it.

  Falls back to `response` followed by the end-of-turn token where the template does not
  start a two-message conversation with the one-message prompt.
  """
  turns = [{"role": "user", "content": user}] if isinstance(user, str) else list(user)
  prompt = render_chat(tokenizer, turns, add_generation_prompt=True)
  full = render_chat(tokenizer, [*turns, {"role": "assistant", "content": response}])
  end = end if end is not None else end_of_turn(tokenizer)
  if not full.startswith(prompt):
    logger.warning("the chat template writes a conversation's start differently with the "
                   "assistant's answer: the response is taken as it is, plus the end-of-turn")
    return response + (end[0] if end and with_end else "")
  written = full[len(prompt):]
  if end is None:
    return written
  cut = written.rfind(end[0])
  if cut < 0:
    return written
  return written[:cut + len(end[0])] if with_end else written[:cut]


def _eos_values(value: Any) -> list[int]:
  """An `eos_token_id` field (int, list of ints or None) as a list."""
  if value is None:
    return []
  if isinstance(value, int):
    return [int(value)]
  if isinstance(value, Iterable) and not isinstance(value, str):
    return [int(v) for v in value if v is not None]
  return []


def _json_eos(path: pathlib.Path) -> list[int]:
  try:
    return _eos_values(json.loads(path.read_text()).get("eos_token_id"))
  except (OSError, ValueError, AttributeError):
    return []   # absent or unreadable: the model's own loader reports a broken config.json


def _cached_hub_file(hub_id: str, name: str) -> pathlib.Path | None:
  """`name` of hub repo `hub_id` (`owner/name[@revision]`) if the local hub cache has it;
  never downloads."""
  repo_id, _, revision = hub_id.partition("@")
  try:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, name, revision=revision or None)
  except Exception:  # noqa: BLE001 (not a valid repo id, no huggingface_hub: nothing cached)
    return None
  return pathlib.Path(found) if isinstance(found, str) else None


def model_eos_ids(model: Any) -> list[int]:
  """The eos ids a model declares. `model` is a model directory or hub id (its config.json and
  generation_config.json; a hub id from the local hub cache only, never fetched), a
  transformers config dict, a `ModelConfig` or a `CausalLM` (its config.json's), or None."""
  if model is None:
    return []
  if isinstance(model, (str, os.PathLike)):
    directory = paths.as_path(model)   # a local directory, gs://..., or a hub id
    ids = []
    for name in ("config.json", "generation_config.json"):
      path = directory / name if directory.is_dir() else _cached_hub_file(str(model), name)
      ids += _json_eos(path) if path is not None else []
    return ids
  if isinstance(model, Mapping):
    return _eos_values(model.get("eos_token_id"))
  cfg = getattr(model, "cfg", model)
  return _eos_values(getattr(cfg, "eos_token_id", None))


def tokenizer_stop_ids(tokenizer: Any) -> list[int]:
  """The tokenizer's eos, its chat template's end-of-turn token, and the known end-of-turn
  tokens its vocabulary holds as added tokens."""
  if tokenizer is None:
    return []
  ids = _eos_values(getattr(tokenizer, "eos_token_id", None))
  end = end_of_turn(tokenizer)
  if end is not None:
    ids.append(end[1])
  added = _added_vocab(tokenizer)
  ids += [added[name] for name in KNOWN_END_OF_TURN if name in added]
  return ids


def stop_ids(tokenizer: Any = None, *models: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
  """Every token id that ends a generation, each once, the tokenizer's eos first: see
  `tokenizer_stop_ids` and `model_eos_ids` (each of `models` is a directory, hub id, config dict,
  `ModelConfig` or `CausalLM`); `extra` ids are added last."""
  ids = tokenizer_stop_ids(tokenizer)
  for model in models:
    ids += model_eos_ids(model)
  return tuple(dict.fromkeys([*ids, *(int(i) for i in extra)]))


def run_model_stop_ids(config: Any) -> tuple[int, ...]:
  """The eos ids that a run's student and teacher declare (`student.path` / `teacher.path`
  files, or their `config` dicts): the tokenizer-free part of a run's stop ids."""
  return stop_ids(None, *(spec.path if spec.path is not None else spec.config
                          for spec in (config.student, config.teacher) if spec is not None))
