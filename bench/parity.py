"""The ports against transformers: max relative logit error per family, float32, on the tiny
random checkpoints of the tests (tests/hf_tiny.py: 1-D weights randomised, sequences longer
than every sliding window, soft-caps biting).

    python bench/parity.py            # one line per family; needs torch (the test extra)
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from hf_tiny import CONFIGS, VOCAB, make_checkpoint  # noqa: E402

from csd_jax.models import load_pretrained  # noqa: E402


def main() -> None:
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 40))
  print(f"{'checkpoint':28s} {'model_type':12s} max relative error (float32, B 2 x T 40)")
  for name in sorted(CONFIGS):
    with tempfile.TemporaryDirectory() as directory:
      reference = make_checkpoint(name, pathlib.Path(directory))
      with torch.no_grad():
        want = reference(torch.tensor(ids)).logits.numpy().astype(np.float64)
      model = load_pretrained(directory)
      got = np.asarray(model(jnp.asarray(ids)), np.float64)
    error = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name:28s} {model.cfg.family:12s} {error:.1e}")


if __name__ == "__main__":
  main()
