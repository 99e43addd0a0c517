"""The `csd-jax` command line: parses arguments and dispatches to the sub-commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from csd_jax.losses import LOSS_NAMES


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="csd-jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  demo = commands.add_parser("demo", help="a short distillation between two small random models")
  demo.add_argument("--steps", type=int, default=60)
  demo.add_argument("--loss", choices=[n for n in LOSS_NAMES if n != "ce"], default="csd")
  demo.add_argument("--seed", type=int, default=0)
  convert = commands.add_parser(
      "convert-gguf", help="write a Hugging Face directory from a LLaMA-architecture GGUF file")
  convert.add_argument("gguf_file")
  convert.add_argument("out_dir")
  convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "demo":
    from csd_jax import demo  # imported here: `csd-jax --help` should not start JAX

    first, last = demo.run(steps=args.steps, loss=args.loss, seed=args.seed)
    return 0 if last < first else 1
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


if __name__ == "__main__":
  raise SystemExit(main())
