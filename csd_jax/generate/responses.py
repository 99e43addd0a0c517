"""`csd-jax generate`: a model's sampled responses to a prompt set, as resumable JSONL.

Each (prompt, sample, turn) is one row, keyed by a `plan.RowKey`: its prompt (the chat
template's conversation so far with the generation prompt, or the minillm / bare template for
single prompts) is tokenised, keeps its last `max_prompt_length` tokens, and is sampled with the
KV cache (`csd_jax.models.generate`) for up to `max_new_tokens`, ending at the first stop id.
Defaults are the official CSD `generate_vllm.py`'s: temperature 0.8, top-p 0.95, 1024 new
tokens, seed 42, one sample.
Multi-turn prompts (MT-Bench's `turns`) are answered turn by turn: every row's turn 1 is asked
after every row's turn 0 is answered, in the conversation with its own first answer.

Batches (`plan.plan_batches`, pure): the rows of a turn are grouped by sampling and by prompt
bucket (widths padded to multiples of `PROMPT_WIDTH_MULTIPLE`), in (prompt, sample) order within
a group, and cut into batches of `batch_size` rows (the last completed with copies whose answers
are dropped): the jitted sampler compiles once per bucket, and the rows spread over the devices'
data axis.

Randomness: row (index i, sample s, turn t) samples with its own key, fold_in(fold_in(fold_in(
key(seed), i), s), t); the key is split per row at every step. A row's draws never depend on the
other rows of its batch nor on the order in which batches run.

Resumable: lines are appended (and fsynced) a batch at a time; each carries index, sample and
turn. A re-run reads the file, truncates a torn last line, and plans the same batches (the plan
depends on the prompts and settings, not on what is done): batches whose rows are all written are
skipped, a partly written one is run again and only its missing rows are written. Same keys and
same batch composition give a resumed run the responses of an uninterrupted one, bit for bit (on
CPU; on GPU as far as XLA's kernels are deterministic). A line written with other settings, for
another prompt or by another model is refused. Once complete, the file is rewritten sorted by
(index, sample, turn), so a resumed run and an uninterrupted one leave the same file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from csd_jax.data.batching import left_pad, until_stop
from csd_jax.data.chat import render_chat
from csd_jax.data.fields import TEMPLATE_NAMES
from csd_jax.data.instruct import render_prompt
from csd_jax.errors import UserError
from csd_jax.generate.plan import Row, RowKey, fill_batch, make_row, plan_batches
from csd_jax.generate.prompt_sets import (MT_BENCH_DEFAULT_TEMPERATURE, MT_BENCH_TEMPERATURES,
                                          Prompt)
from csd_jax.models import generate
from csd_jax.sampling import Sampling

logger = logging.getLogger("csd_jax.generate")

# The official general-chat generation script (aailab-kaist/CSD generate/generate_vllm.py).
DEFAULT_SAMPLING = Sampling(temperature=0.8, top_p=0.95)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How responses are sampled; `batch_size` rows a batch (it sets the batches, so keep it when
  resuming for bit-identical responses)."""

  sampling: Sampling = DEFAULT_SAMPLING
  max_new_tokens: int = 1024
  max_prompt_length: int = 2048
  seed: int = 42
  n: int = 1                       # samples per prompt
  batch_size: int = 32
  template: str = "chat"
  mt_bench_temperatures: bool = False   # FastChat's temperature per MT-Bench category

  def __post_init__(self) -> None:
    for name in ("max_new_tokens", "max_prompt_length", "n", "batch_size"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
    if self.template not in TEMPLATE_NAMES:
      raise UserError(f"template {self.template!r}: valid: {', '.join(TEMPLATE_NAMES)}")

  def sampling_for(self, prompt: Prompt) -> Sampling:
    if not self.mt_bench_temperatures:
      return self.sampling
    temperature = MT_BENCH_TEMPERATURES.get(prompt.category, MT_BENCH_DEFAULT_TEMPERATURE)
    return dataclasses.replace(self.sampling, temperature=temperature)

  def line_settings(self, sampling: Sampling) -> dict[str, Any]:
    """The settings a line records (and a resumed run must match)."""
    return {**dataclasses.asdict(sampling), "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length, "seed": self.seed,
            "template": self.template}


class ResponseFile:
  """The JSONL of responses, one line a (index, sample, turn): read back on opening (a torn last
  line truncated away), appended a batch at a time, rewritten sorted when complete."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.done: dict[RowKey, dict[str, Any]] = {}
    self.appended = False
    if self.path.exists():
      self._read()

  def _read(self) -> None:
    raw = self.path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):   # an append cut short by a kill: never a whole line
      logger.warning("%s: dropping a torn last line (%d bytes, written when the run was "
                     "stopped)", self.path, len(raw) - end)
      with open(self.path, "r+b") as f:
        f.truncate(end)
    for number, line in enumerate(raw[:end].split(b"\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key = RowKey.of(record)
        if not all(isinstance(k, int) for k in key) or not isinstance(record["response"], str):
          raise TypeError
      except (ValueError, KeyError, TypeError):
        raise UserError(f"{self.path}:{number}: not a `csd-jax generate` response line; pass "
                        "another --out (or remove the file)") from None
      if key in self.done:
        raise UserError(f"{self.path}:{number}: {key.label()} is written twice; the file was "
                        "edited or merged: pass another --out")
      self.done[key] = record

  def append(self, records: Sequence[Mapping[str, Any]]) -> None:
    """Write `records` in one append, flushed to disk before returning."""
    with open(self.path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
      f.flush()
      os.fsync(f.fileno())
    for r in records:
      self.done[RowKey.of(r)] = dict(r)
    self.appended = True

  def records(self) -> list[dict[str, Any]]:
    return [self.done[k] for k in sorted(self.done)]

  def rewrite_sorted(self) -> None:
    """The file in (index, sample, turn) order, through a temporary file (atomic)."""
    temporary = self.path.with_name(self.path.name + ".tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                 for r in self.records()), encoding="utf-8")
    os.replace(temporary, self.path)


@jax.jit
def _prng_keys(seed: jax.Array, index: jax.Array, sample: jax.Array, turn: jax.Array
              ) -> jax.Array:
  fold = jax.random.fold_in
  base = jax.random.key(seed)
  return jax.vmap(lambda i, s, t: fold(fold(fold(base, i), s), t))(index, sample, turn)


class _Progress:
  """Lines on stderr (the log) at most every `every` seconds: responses done / total and the
  new tokens per second of this run."""

  def __init__(self, total: int, done: int, every: float):
    self.total, self.done, self.every = total, done, every
    self.start = self.last = time.perf_counter()
    self.tokens = self.rows = 0
    self.shown = -1   # `done` when last shown

  def update(self, rows: int, tokens: int, turn: int, turns: int, *, final: bool = False
             ) -> None:
    self.done, self.rows, self.tokens = self.done + rows, self.rows + rows, self.tokens + tokens
    now = time.perf_counter()
    if (now - self.last < self.every and not final) or self.shown == self.done:
      return
    self.last, self.shown, elapsed = now, self.done, max(now - self.start, 1e-9)
    eta = (self.total - self.done) * elapsed / self.rows if self.rows else 0.0
    logger.info("%d/%d responses (%.0f%%), turn %d/%d, %s new tokens/s, ETA %d:%02d:%02d",
                self.done, self.total, 100 * self.done / max(self.total, 1), turn + 1, turns,
                f"{self.tokens / elapsed:,.0f}", eta // 3600, eta // 60 % 60, eta % 60)


def _render(prompt: Prompt, turn: int, answers: Sequence[str], tokenizer: Any,
            template: str) -> str:
  """The text of row (prompt, turn): the conversation so far and the generation prompt."""
  if template != "chat":
    return render_prompt({"instruction": prompt.turns[0], "context": prompt.context}, template)
  messages = list(prompt.history)
  for t in range(turn + 1):
    messages.append({"role": "user", "content": prompt.user_text(t)})
    if t < turn:
      messages.append({"role": "assistant", "content": answers[t]})
  return render_chat(tokenizer, messages, add_generation_prompt=True)


def check_prompts(prompts: Sequence[Prompt], tokenizer: Any, template: str) -> None:
  """Refuse, before any generation, prompts the template cannot render."""
  if template == "chat":
    if not getattr(tokenizer, "chat_template", None):
      raise UserError(f"--template chat needs a tokenizer with a chat template "
                      f"({type(tokenizer).__name__} has none); pass --template minillm or none")
    return
  chat = next((p for p in prompts if p.history or len(p.turns) > 1), None)
  if chat is not None:
    raise UserError(f"prompt {chat.index} is a conversation (messages or turns): --template "
                    f"{template} renders single prompts only; pass --template chat")


def _check_known(file: ResponseFile, prompts: Sequence[Prompt], n: int) -> None:
  for key in file.done:
    if not (key.index < len(prompts) and key.sample < n
            and key.turn < len(prompts[key.index].turns)):
      raise UserError(f"{file.path} holds a response ({key.label()}) that this run does not ask "
                      "for: pass the same --prompts, --n and --max-examples as the run that "
                      "wrote it, or another --out")


def _check_line(line: Mapping[str, Any], text: str, settings: Mapping[str, Any], model_id: str,
                path: pathlib.Path) -> None:
  """A written line must come from the same prompt, settings and model as this run's row."""
  key = RowKey.of(line).label()
  if line.get("settings") != settings:
    raise UserError(f"{path}: {key} was written with other settings ({line.get('settings')} vs "
                    f"{dict(settings)}); resume with the same settings, or pass another --out")
  if line.get("model") != model_id:
    raise UserError(f"{path}: {key} was written by model {line.get('model')!r}, not "
                    f"{model_id!r}; pass the same --model-id, or another --out")
  if line.get("prompt") != text:
    raise UserError(f"{path}: {key} answers another prompt than the prompt file's; the file "
                    "changed since: pass another --out")


def _turn_rows(prompts: Sequence[Prompt], turn: int, tokenizer: Any, config: GenerateConfig,
               file: ResponseFile) -> tuple[list[Row], int]:
  """The rows of `turn`, in (index, sample) order, and how many prompts were longer than
  `max_prompt_length` (each counted by its sample 0's row, not once per sample)."""
  asked = [p for p in prompts if len(p.turns) > turn]
  keys = [RowKey(p.index, s, turn) for p in asked for s in range(config.n)]
  special = config.template != "chat"   # a chat template writes its own BOS
  if turn == 0:   # one text per prompt, whatever n
    texts = [_render(p, 0, [], tokenizer, config.template) for p in asked]
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]
               for _ in range(config.n)]
  else:   # each sample's own conversation so far
    texts = [_render(prompts[k.index], turn,
                     [file.done[k._replace(turn=t)]["response"] for t in range(turn)],
                     tokenizer, config.template) for k in keys]
    encoded = tokenizer(texts, add_special_tokens=special)["input_ids"]
  cut = sum(len(ids) > config.max_prompt_length and k.sample == 0
            for k, ids in zip(keys, encoded))
  rows = [make_row(k, ids, config.sampling_for(prompts[k.index]), config.max_prompt_length)
          for k, ids in zip(keys, encoded)]
  return rows, cut


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                       config: GenerateConfig, path: str | os.PathLike, *, model_id: str,
                       stops: Sequence[int], progress_every: float = 10.0
                       ) -> list[dict[str, Any]]:
  """Sample `config.n` responses per prompt (every turn of a multi-turn one) into the JSONL at
  `path`, resuming what it holds; returns every line, sorted by (index, sample, turn)."""
  check_prompts(prompts, tokenizer, config.template)
  file = ResponseFile(path)
  _check_known(file, prompts, config.n)
  pad = getattr(tokenizer, "pad_token_id", None)
  pad = int(pad) if pad is not None else (int(stops[0]) if stops else 0)  # masked: any id
  turns = max(len(p.turns) for p in prompts)
  progress = _Progress(sum(len(p.turns) for p in prompts) * config.n, len(file.done),
                       progress_every)
  cut = 0
  for turn in range(turns):
    rows, longer = _turn_rows(prompts, turn, tokenizer, config, file)
    cut += longer
    for batch in plan_batches(rows, config.batch_size):
      for row in batch:
        if row.key in file.done:   # written by an earlier run: it must answer this very row
          _check_line(file.done[row.key], prompts[row.key.index].user_text(turn),
                      config.line_settings(row.sampling), model_id, file.path)
      if all(row.key in file.done for row in batch):
        continue
      lines, tokens = _run_batch(model, tokenizer, prompts, batch, config, file, model_id,
                                 stops, pad)
      file.append(lines)
      progress.update(len(lines), tokens, turn, turns)
  progress.update(0, 0, turns - 1, turns, final=True)
  if cut:
    logger.warning("%d prompts were longer than --max-prompt-length %d tokens: their start was "
                   "cut", cut, config.max_prompt_length)
  if file.appended or list(file.done) != sorted(file.done):   # (a run cut while rewriting)
    file.rewrite_sorted()
  return file.records()


def _run_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt], batch: Sequence[Row],
               config: GenerateConfig, file: ResponseFile, model_id: str,
               stops: Sequence[int], pad: int) -> tuple[list[dict[str, Any]], int]:
  """Sample one batch (completed to `batch_size` rows with copies of its last row); the lines of
  its rows not yet written, and the new tokens they hold."""
  rows = fill_batch(batch, config.batch_size)
  ids, mask = left_pad([r.ids for r in rows], batch[0].width, pad)
  index = np.asarray([r.key.index for r in rows], np.int32)
  sample = np.asarray([r.key.sample for r in rows], np.int32)
  turn = np.asarray([r.key.turn for r in rows], np.int32)
  prng = _prng_keys(np.int32(config.seed), index, sample, turn)
  out = np.asarray(generate(model, ids, prompt_mask=mask, max_new_tokens=config.max_new_tokens,
                            sampling=batch[0].sampling, eos_id=tuple(stops), pad_id=pad,
                            row_keys=prng))
  lines, tokens = [], 0
  for row, new in zip(batch, out):
    if row.key in file.done:
      continue
    kept = until_stop(new, stops)
    finished = len(kept) < len(new)
    tokens += len(kept) + finished
    lines.append({"index": row.key.index, "sample": row.key.sample, "turn": row.key.turn,
                  "prompt": prompts[row.key.index].user_text(row.key.turn),
                  "response": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                  "model": model_id, "finished": bool(finished),
                  "new_tokens": int(len(kept) + finished),
                  "settings": config.line_settings(row.sampling)})
  return lines, tokens
