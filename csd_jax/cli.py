"""The `csd-jax` command line: parses arguments and dispatches to the sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from csd_jax.losses import LOSS_NAMES


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="csd-jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser(
      "demo", help="distil SmolLM2-135M-Instruct into a 4-layer student, offline (~7 min on "
                   "a 2-core CPU)")
  demo.add_argument("--workdir", default="workdirs/demo")
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
  evaluate = commands.add_parser(
      "eval", help="ROUGE-L, Self-BLEU, perplexity (and teacher KL / CSD) by generation")
  source = evaluate.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a run: its latest checkpoint's student")
  source.add_argument("--model", help="a Hugging Face model directory")
  evaluate.add_argument("--teacher", help="a model directory, for KL and CSD")
  evaluate.add_argument("--data", action="append", required=True, metavar="NAME=FILE",
                        help="an evaluation set (JSONL / JSON / Parquet); repeatable")
  evaluate.add_argument("--seeds", default="10,20,30,40,50")
  evaluate.add_argument("--temperature", type=float, default=1.0)
  evaluate.add_argument("--top-p", type=float, default=1.0)
  evaluate.add_argument("--top-k", type=int, default=0)
  evaluate.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="forbid repeating any n-gram (the paper's option: 6; 0 = off)")
  evaluate.add_argument("--max-prompt-length", type=int, default=256)
  evaluate.add_argument("--max-length", type=int, default=512)
  evaluate.add_argument("--max-examples", type=int, default=None)
  evaluate.add_argument("--template", choices=["minillm", "chat", "none"], default="minillm")
  evaluate.add_argument("--out", help="results JSON (default: WORKDIR/eval_results.json)")
  convert = commands.add_parser(
      "convert-gguf", help="write a Hugging Face directory from a LLaMA-architecture GGUF file")
  convert.add_argument("gguf_file")
  convert.add_argument("out_dir")
  convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "demo":
    return _demo(args)
  if args.command == "train":
    return _train(args)
  if args.command == "export":
    from csd_jax.config import ConfigError
    from csd_jax.train.export import export

    try:
      out, step = export(args.workdir, args.out)
    except (ConfigError, ValueError, FileNotFoundError) as error:
      print(f"csd-jax export: {error}", file=sys.stderr)
      return 2
    print(f"wrote the student of step {step} to {out}")
    return 0
  if args.command == "eval":
    return _eval(args)
  if args.command == "convert-gguf":
    from csd_jax.models.gguf import convert_gguf

    try:
      out = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as error:
      print(f"csd-jax convert-gguf: {error}", file=sys.stderr)
      return 2
    print(f"wrote {out}")
    return 0
  raise AssertionError(args.command)  # argparse only lets known commands through


def _setup_logging() -> None:
  import logging

  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax"):  # their INFO lines drown the run's own
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _demo(args: argparse.Namespace) -> int:
  from csd_jax import demo  # imported here: `csd-jax --help` should not start JAX
  from csd_jax.config import ConfigError

  _setup_logging()
  try:
    results = demo.run(args.workdir, loss=args.loss, steps=args.steps, overrides=args.overrides)
  except (ConfigError, ValueError, FileNotFoundError) as error:
    print(f"csd-jax demo: {error}", file=sys.stderr)
    return 2
  return 0 if results["after"]["csd"] < results["before"]["csd"] else 1


def _eval(args: argparse.Namespace) -> int:
  import pathlib

  _setup_logging()
  from csd_jax.config import ConfigError
  from csd_jax.eval import generation

  try:
    import transformers

    from csd_jax.models import load_pretrained
    from csd_jax.sharding import make_mesh
    from csd_jax.train.export import restore_student, run_tokenizer

    mesh = make_mesh(-1, 1, 1)   # every device decodes its share of the prompts

    datasets = {}
    for item in args.data:
      name, sep, path = item.partition("=")
      if not sep:
        raise ValueError(f"--data {item!r}: expected NAME=FILE, e.g. dolly=dolly_test.jsonl")
      datasets[name] = generation.load_records(path, args.max_examples)
    if args.workdir:
      model, config, _ = restore_student(args.workdir)
      tokenizer = run_tokenizer(config)
      out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "eval_results.json")
    else:
      model = load_pretrained(args.model, mesh=mesh)
      tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
      out = pathlib.Path(args.out or "eval_results.json")
    if tokenizer is None:
      raise ValueError("no tokenizer found for this model (data.tokenizer, teacher or student)")
    teacher = load_pretrained(args.teacher, mesh=mesh) if args.teacher else None
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cfg = generation.EvalConfig(seeds=seeds, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, no_repeat_ngram_size=args.no_repeat_ngram_size,
                                max_prompt_length=args.max_prompt_length,
                                max_length=args.max_length, template=args.template)
    results = generation.evaluate(model, tokenizer, datasets, teacher=teacher, config=cfg)
  except (ConfigError, ValueError, FileNotFoundError) as error:
    print(f"csd-jax eval: {error}", file=sys.stderr)
    return 2
  generation.write_results(results, out)
  print(generation.format_table(results))
  print(f"results in {out}")
  return 0


def _train(args: argparse.Namespace) -> int:
  from csd_jax.config import ConfigError, load_config

  _setup_logging()
  try:
    config = load_config(args.config, args.overrides)
  except ConfigError as error:
    print(f"csd-jax train: {error}", file=sys.stderr)
    return 2
  from csd_jax import distributed
  from csd_jax.train.loop import train

  try:
    distributed.initialize()
    train(config, args.workdir)
  except (ValueError, FileNotFoundError) as error:
    print(f"csd-jax train: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
