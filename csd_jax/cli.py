"""The `csd-jax` command line: parses arguments and dispatches to the sub-commands.

A `UserError` (bad input a user can fix: a config key, a path, a mesh) is printed in one line
and the command exits with status 2; Ctrl-C exits 130 (training saves first); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from csd_jax.errors import UserError
from csd_jax.eval.tasks import ALIASES as TASK_ALIASES
from csd_jax.eval.tasks import TASK_NAMES
from csd_jax.losses import LOSS_NAMES


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="csd-jax", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser(
      "demo", help="distil SmolLM2-135M-Instruct (or --teacher gemma3-270m: Gemma 3 270M) into "
                   "a layer-dropped student, offline (~10 min on a 2-core CPU)")
  demo.add_argument("--teacher", choices=["smollm2", "gemma3-270m"], default="smollm2")
  demo.add_argument("--workdir", default=None,
                    help="default: workdirs/demo (smollm2), workdirs/demo-gemma3-270m")
  demo.add_argument("--loss", choices=[n for n in LOSS_NAMES if n != "ce"], default="csd")
  demo.add_argument("--steps", type=int, default=None, help="default: configs/demo.yaml's")
  demo.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for the distillation, e.g. optim.lr=1e-3")
  train = commands.add_parser(
      "train", help="distill a teacher into a student; re-running continues in the workdir")
  train.add_argument("--config", required=True, help="a YAML file, e.g. configs/tiny.yaml")
  train.add_argument("--workdir", required=True)
  train.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. train.steps=100 loss.name=fkl")
  export = commands.add_parser(
      "export", help="the student of a run's latest checkpoint as a Hugging Face directory")
  export.add_argument("--workdir", required=True)
  export.add_argument("--out", required=True)
  export.add_argument("--best", action="store_true",
                      help="the best checkpoint of model selection (W/best/), not the latest")
  evaluate = commands.add_parser(
      "eval", help="ROUGE-L, Self-BLEU, perplexity (and teacher KL / CSD) by generation")
  source = evaluate.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run: its latest checkpoint's student, judged on the "
                                        "run's own template and lengths")
  source.add_argument("--model", help="a Hugging Face model directory, or a hub id "
                                      "(owner/name[@revision])")
  evaluate.add_argument("--teacher", help="a model directory or hub id, for KL and CSD")
  evaluate.add_argument("--data", action="append", required=True, metavar="NAME=FILE",
                        help="an evaluation set (JSONL / JSON / Parquet); repeatable")
  evaluate.add_argument("--best", action="store_true",
                        help="with --workdir: the run's best checkpoint (W/best/)")
  evaluate.add_argument("--protocol", choices=["minillm", "run"], default="minillm",
                        help="minillm (default): the official evaluation (first 256 prompt "
                             "tokens, 256 new tokens, no_repeat_ngram_size 6, seeds 10-50); "
                             "run: the run's own template and lengths; flags below override")
  evaluate.add_argument("--seeds", default=None, help="default: 10,20,30,40,50")
  evaluate.add_argument("--temperature", type=float, default=1.0)
  evaluate.add_argument("--top-p", type=float, default=1.0)
  evaluate.add_argument("--top-k", type=int, default=0)
  evaluate.add_argument("--no-repeat-ngram-size", type=int, default=None,
                        help="forbid repeating any n-gram (0 = off; minillm protocol: 6)")
  evaluate.add_argument("--max-prompt-length", type=int, default=None,
                        help="default: 256 (run protocol: the run's data.max_prompt_length)")
  evaluate.add_argument("--max-length", type=int, default=None,
                        help="default: 512 (run protocol: the run's data.max_length)")
  evaluate.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per prompt (minillm protocol: 256; run protocol: "
                             "max length minus the prompt bucket's width)")
  evaluate.add_argument("--keep-prompt", choices=["start", "end"], default=None,
                        help="which end of a long prompt is kept (minillm: start, run: end)")
  evaluate.add_argument("--prompt-special-tokens", action=argparse.BooleanOptionalAction,
                        default=None, help="encode prompts with the tokenizer's special tokens "
                                           "(LLaMA's BOS; minillm: yes, run: no)")
  evaluate.add_argument("--max-examples", type=int, default=None)
  evaluate.add_argument("--template", choices=["minillm", "chat", "none"], default=None,
                        help="default: a run's data.template, else minillm")
  evaluate.add_argument("--out", help="results JSON (default: WORKDIR/eval_results.json)")
  evaluate.add_argument("--task", choices=[*TASK_NAMES, *TASK_ALIASES], default=None,
                        help="a task judged as its official evaluator does, greedily through "
                             "the chat template: gsm8k (accuracy), summarization (ROUGE-1/2/L), "
                             "translation (BLEU, chrF, COMET); --data: speculative_kd's files")
  evaluate.add_argument("--comet-model", help="--task translation: a COMET checkpoint on disk "
                                              "(model.ckpt; never downloaded)")
  evaluate.add_argument("--batch-size", type=int, default=None,
                        help="--task: rows per generation batch (default 16)")
  convert = commands.add_parser(
      "convert-gguf", help="write a Hugging Face directory from a GGUF file (architectures "
                           "llama, gemma3)")
  convert.add_argument("gguf_file")
  convert.add_argument("out_dir")
  convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
  _add_generate(commands)
  compile_ = commands.add_parser(
      "compile", help="compile a run for a TPU slice on a machine without one (libtpu): "
                      "memory per chip, fits or not, cost, collectives")
  compile_.add_argument("--config", required=True, help="a YAML file, e.g. configs/tiny.yaml")
  compile_.add_argument("--topology", help="a TPU slice, e.g. v5e-8, v5p-128, v6e-256 "
                                           "(default: the config's mesh.slice)")
  compile_.add_argument("--slices", type=int, default=1, help="slices of that topology")
  compile_.add_argument("--out", help="a directory for report.json and the optimized HLO")
  compile_.add_argument("--must-fit", action="store_true",
                        help="exit with status 2 when a program does not fit the chips' HBM")
  compile_.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, as for train")
  pairs = commands.add_parser(
      "pairs", help="join a teacher's and a student's csd-jax generate files into the chat "
                    "pairs file of data.source: pairs (the official reformat.py's train.json)")
  pairs.add_argument("--teacher", required=True, help="the teacher's generate JSONL")
  pairs.add_argument("--student", required=True, help="the student's generate JSONL")
  pairs.add_argument("--out", required=True, help="train.json")
  report = commands.add_parser(
      "report", help="the paper's Table 1 (ROUGE-L mean ± std over seeds per set, Avg.) from "
                     "csd-jax eval results, as Markdown (and CSV with --out)")
  report.add_argument("runs", nargs="+", metavar="RUN",
                      help="a run directory, results JSON, or NAME=PATH")
  report.add_argument("--out", help="write the Markdown here and the CSV beside it (same stem, "
                                    ".csv; an --out ending in .csv swaps them)")
  return parser


def _add_generate(commands: Any) -> None:
  generate = commands.add_parser(
      "generate", help="a model's sampled responses to a prompt set, as JSONL or AlpacaEval / "
                       "MT-Bench answer files; re-running resumes where it stopped")
  source = generate.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", help="a Hugging Face model directory, or a hub id "
                                      "(owner/name[@revision])")
  source.add_argument("--workdir", help="a run: its latest checkpoint's student")
  generate.add_argument("--best", action="store_true",
                        help="with --workdir: the run's best checkpoint (W/best/)")
  generate.add_argument("--prompts", required=True,
                        help="JSONL / JSON / Parquet: instruction / prompt / question (+ context "
                             "/ input), chat messages, or MT-Bench turns")
  generate.add_argument("--out", required=True, help="the output file (jsonl: resumable)")
  generate.add_argument("--format", choices=["jsonl", "alpaca_eval", "mt_bench"],
                        default="jsonl", help="alpaca_eval: AlpacaEval's model outputs JSON; "
                                              "mt_bench: FastChat's answer JSONL")
  generate.add_argument("--model-id", help="the name written as model / generator / model_id "
                                           "(default: the directory's name)")
  generate.add_argument("--n", type=int, default=1, help="responses per prompt")
  generate.add_argument("--seed", type=int, default=42)
  generate.add_argument("--temperature", type=float, default=0.8)
  generate.add_argument("--top-p", type=float, default=0.95)
  generate.add_argument("--top-k", type=int, default=0, help="0 = off")
  generate.add_argument("--mt-bench-temperatures", action="store_true",
                        help="FastChat's temperature per MT-Bench category (math, coding, "
                             "reasoning, extraction greedy; stem, humanities 0.1; others 0.7)")
  generate.add_argument("--max-new-tokens", type=int, default=1024)
  generate.add_argument("--max-prompt-length", type=int, default=2048,
                        help="a longer prompt keeps its last tokens")
  generate.add_argument("--batch-size", type=int, default=32,
                        help="rows per batch (keep it when resuming: bit-identical responses)")
  generate.add_argument("--template", choices=["chat", "minillm", "none"], default=None,
                        help="default: a run's data.template, else chat")
  generate.add_argument("--max-examples", type=int, default=None)
  generate.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="a model directory's weights and compute (auto: bfloat16 on "
                             "GPU / TPU, float32 on CPU)")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from csd_jax.runtime.platforms import skip_absent_tpu

  skip_absent_tpu()
  command: Callable[[argparse.Namespace], int] = {
      "demo": _demo, "train": _train, "export": _export, "eval": _eval,
      "convert-gguf": _convert_gguf, "report": _report, "generate": _generate,
      "pairs": _pairs, "compile": _compile}[args.command]
  try:
    return command(args)
  except UserError as error:  # anything else is a bug: its traceback is shown
    print(f"csd-jax {args.command}: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:   # Ctrl-C outside training's own handler (start-up, eval, export)
    print(f"csd-jax {args.command}: interrupted", file=sys.stderr)
    return 130


# The commands import their modules when they run: `csd-jax --help` should not start JAX.

def _demo(args: argparse.Namespace) -> int:
  from csd_jax.demo import command as demo
  from csd_jax.runtime.logs import setup_logging

  setup_logging()
  workdir = args.workdir or ("workdirs/demo" if args.teacher == "smollm2"
                             else f"workdirs/demo-{args.teacher}")
  results = demo.run(workdir, teacher=args.teacher, loss=args.loss, steps=args.steps,
                     overrides=args.overrides)
  return 0 if results["after"]["csd"] < results["before"]["csd"] else 1


def _train(args: argparse.Namespace) -> int:
  from csd_jax.config import load_config
  from csd_jax.runtime.logs import setup_logging

  setup_logging()
  config = load_config(args.config, args.overrides)
  from csd_jax.runtime import distributed
  from csd_jax.train.loop import train

  distributed.initialize()
  result = train(config, args.workdir)
  return 130 if result.interrupted else 0   # Ctrl-C: saved, and told as the shell expects


def _export(args: argparse.Namespace) -> int:
  from csd_jax.runtime.logs import setup_logging
  from csd_jax.train.export import export

  setup_logging()
  out, step = export(args.workdir, args.out, best=args.best)
  print(f"wrote the student of step {step} to {out}")
  return 0


def _eval(args: argparse.Namespace) -> int:
  from csd_jax.eval.command import EvalRequest, run_eval
  from csd_jax.eval.generation import format_table
  from csd_jax.runtime.logs import setup_logging

  setup_logging()
  if args.task:
    return _eval_task(args)
  if args.comet_model or args.batch_size is not None:
    raise UserError("--comet-model and --batch-size go with --task")
  try:
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
  except ValueError:
    raise UserError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. "
                    "10,20,30") from None
  request = EvalRequest(
      data=args.data, workdir=args.workdir, model=args.model, teacher=args.teacher,
      best=args.best, protocol=args.protocol, seeds=seeds, temperature=args.temperature,
      top_p=args.top_p, top_k=args.top_k, no_repeat_ngram_size=args.no_repeat_ngram_size,
      template=args.template, max_prompt_length=args.max_prompt_length,
      max_length=args.max_length, max_new_tokens=args.max_new_tokens,
      keep_prompt=args.keep_prompt, prompt_special_tokens=args.prompt_special_tokens,
      max_examples=args.max_examples, out=args.out)
  results, out = run_eval(request)
  print(format_table(results))
  print(f"results in {out}")
  return 0


def _eval_task(args: argparse.Namespace) -> int:
  from csd_jax.eval.generation import format_table
  from csd_jax.eval.tasks.runner import TaskRequest, run_task

  for flag, value in (("--teacher", args.teacher), ("--seeds", args.seeds),
                      ("--template", args.template), ("--max-length", args.max_length),
                      ("--keep-prompt", args.keep_prompt),
                      ("--no-repeat-ngram-size", args.no_repeat_ngram_size)):
    if value is not None:
      raise UserError(f"{flag} does not apply to --task: a task decodes greedily through the "
                      "chat template, as its official evaluator (see --max-new-tokens)")
  results, out, task = run_task(TaskRequest(
      task=args.task, data=args.data, workdir=args.workdir, model=args.model, best=args.best,
      max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
      max_examples=args.max_examples, prompt_special_tokens=bool(args.prompt_special_tokens),
      batch_size=16 if args.batch_size is None else args.batch_size,
      comet_model=args.comet_model, out=args.out))
  print(format_table(results, task.COLUMNS))
  print(f"results in {out}")
  return 0


def _convert_gguf(args: argparse.Namespace) -> int:
  from csd_jax.models.io.gguf import convert_gguf
  from csd_jax.train.export import check_out_dir

  check_out_dir(args.out_dir, "out_dir")
  out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
  print(f"wrote {out}")
  return 0


def _generate(args: argparse.Namespace) -> int:
  from csd_jax.generate.command import GenerateRequest, run_generate
  from csd_jax.runtime.logs import setup_logging

  setup_logging()
  out, summary = run_generate(GenerateRequest(
      prompts=args.prompts, out=args.out, workdir=args.workdir, model=args.model,
      best=args.best, output_format=args.format, model_id=args.model_id, n=args.n,
      seed=args.seed, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
      max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
      batch_size=args.batch_size, template=args.template,
      mt_bench_temperatures=args.mt_bench_temperatures, max_examples=args.max_examples,
      dtype=args.dtype))
  print(f"{summary['responses']} responses of {summary['model_id']} ({summary['new_tokens']} "
        f"new tokens, {summary['unfinished']} cut at --max-new-tokens) in {out}")
  return 0


def _report(args: argparse.Namespace) -> int:
  from csd_jax.eval.report import output_paths, run_report

  print(run_report(args.runs, args.out), end="")
  if args.out:
    md_path, csv_path = output_paths(args.out)
    print(f"wrote {md_path} and {csv_path}")
  return 0


def _compile(args: argparse.Namespace) -> int:
  from csd_jax.compile.command import CompileRequest, run_compile
  from csd_jax.compile.report import format_report
  from csd_jax.runtime.logs import setup_logging

  setup_logging()
  report = run_compile(CompileRequest(config=args.config, overrides=args.overrides,
                                      topology=args.topology, num_slices=args.slices,
                                      out=args.out))
  print(format_report(report))
  if args.out:
    print(f"report and HLO in {args.out}")
  return 2 if args.must_fit and not report.fits else 0


def _pairs(args: argparse.Namespace) -> int:
  from csd_jax.generate import pairs_file

  records = pairs_file.join(args.teacher, args.student)
  pairs_file.write(records, args.out)
  print(f"{len(records)} pairs in {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
