"""Run `csd-jax train` in this process (tests/test_checkpoint.py starts it as a subprocess)."""

import sys

from csd_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.main(["train", *sys.argv[1:]]))
