"""What `notebooks/inspect_losses.ipynb` shows, computed here so that it is tested code:

- `loss_curves`: a metric of several runs (CSD vs baselines), step by step;
- `open_run` + `token_report`: on a held-out batch, the per-token CSD of the run's student
  against its teacher, the residual d = z - t (centred as CSD sees it), the student's and the
  teacher's probabilities, and the positions where the two disagree most;
- `temperature_sweep` / `fidelity_diversity`: ROUGE-L against Self-BLEU over sampling
  temperatures, from the sweep's results (W/eval/temperature_<T>.json).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from csd_jax.runtime import paths
from csd_jax.errors import UserError
from csd_jax.losses import IGNORE_LABEL, per_token_loss
from csd_jax.metrics import read_metrics

PathLike = paths.PathLike


def loss_curves(workdirs: Mapping[str, PathLike], key: str = "loss"
                ) -> dict[str, tuple[list[int], list[float]]]:
  """(steps, values) of `key` for every run that logged it."""
  curves = {}
  for name, workdir in workdirs.items():
    rows = [r for r in read_metrics(workdir) if key in r]
    if rows:
      curves[name] = ([int(r["step"]) for r in rows], [float(r[key]) for r in rows])
  return curves


@dataclasses.dataclass
class Run:
  """A run, opened: its config, its latest student, its teacher, a held-out batch."""

  workdir: epath.Path
  config: Any
  step: int
  student: Any
  teacher: Any
  tokenizer: Any | None
  vocab_size: int
  batch: dict[str, np.ndarray]


def open_run(workdir: PathLike) -> Run:
  """The run's latest checkpoint's student, its teacher (rebuilt from the config, as training
  built it) and the first batch of its held-out data (else of its training data)."""
  from csd_jax.run import models as run_lib
  from csd_jax.data.inputs import build_inputs  # grain / TFDS: only when a notebook asks
  from csd_jax.runtime.sharding import make_mesh

  opened = run_lib.open_run(workdir, teacher=True)
  if opened.teacher is None:
    raise UserError(f"{workdir} is a supervised fine-tuning run (teacher: null): the notebook "
                    "compares a student with its teacher; open a distillation run")
  one_device = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])  # a batch of any size
  inputs = build_inputs(opened.config, one_device, opened.vocab_size, opened.tokenizer)
  loader = inputs.eval if inputs.eval is not None else inputs.train
  batch = {k: np.asarray(v) for k, v in next(loader).items()}
  return Run(opened.workdir, opened.config, opened.step, opened.student, opened.teacher,
             opened.tokenizer, opened.vocab_size, batch)


def _token_text(tokenizer: Any | None, token: int) -> str:
  return repr(tokenizer.decode([token])) if tokenizer is not None else str(token)


def token_report(run: Run, *, w1: str | float = "student", w2: str | float = "student",
                 temperature: float = 1.0, top: int = 10) -> dict[str, Any]:
  """Per-token CSD [B, T] (NaN off the targets), and at the targets: the CSD residual
  d - E_w2[d] and the student's / teacher's probabilities over the vocabulary (flattened), and
  the `top` positions of largest CSD with both models' most likely next tokens."""
  batch = run.batch
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  positions = jnp.asarray(batch["positions"])  # packed rows restart them per segment
  vocab = run.vocab_size
  z = run.student(ids, mask, positions)[..., :vocab].astype(jnp.float32)
  t = run.teacher(ids, mask, positions)[..., :vocab].astype(jnp.float32)
  targets = np.asarray(batch["labels"]) != IGNORE_LABEL
  per_token = np.asarray(per_token_loss("csd", z, t, w1=w1, w2=w2, temperature=temperature))
  per_token = np.where(targets, per_token, np.nan)
  q = np.asarray(jax.nn.softmax(z / temperature, -1))[targets]
  p = np.asarray(jax.nn.softmax(t / temperature, -1))[targets]
  weight2 = {"student": q, "teacher": p}.get(w2, None) if isinstance(w2, str) else (
      w2 * p + (1 - w2) * q)
  if weight2 is None:  # uniform
    weight2 = np.full_like(q, 1.0 / vocab)
  d = np.asarray(z - t)[targets]
  residual = d - np.sum(weight2 * d, -1, keepdims=True)
  rows, cols = np.nonzero(targets)
  order = np.argsort(-per_token[targets])[:top]
  z_top, t_top = np.asarray(jnp.argmax(z, -1)), np.asarray(jnp.argmax(t, -1))
  disagreements = [{"row": int(rows[i]), "position": int(cols[i]),
                    "csd": float(per_token[rows[i], cols[i]]),
                    "input": _token_text(run.tokenizer, int(ids[rows[i], cols[i]])),
                    "target": _token_text(run.tokenizer, int(batch["labels"][rows[i], cols[i]])),
                    "teacher_top": _token_text(run.tokenizer, int(t_top[rows[i], cols[i]])),
                    "student_top": _token_text(run.tokenizer, int(z_top[rows[i], cols[i]]))}
                   for i in order]
  return {"per_token": per_token, "residual": residual.ravel(), "student_probs": q.ravel(),
          "teacher_probs": p.ravel(), "disagreements": disagreements}


def temperature_sweep(run: Run, datasets: Mapping[str, Sequence[Mapping[str, str]]],
                      temperatures: Sequence[float], *, seeds: Sequence[int] = (10, 20),
                      batch_size: int = 16) -> list[epath.Path]:
  """Evaluate the run's student at each temperature; results in W/eval/temperature_<T>.json."""
  from csd_jax.eval.generation import evaluate, run_settings, write_results

  if run.tokenizer is None:
    raise ValueError(f"{run.workdir}: the run has no tokenizer (synthetic data): evaluation by "
                     "generation needs one")
  written = []
  for temperature in temperatures:
    settings = run_settings(run.config)
    cfg = dataclasses.replace(settings, seeds=tuple(seeds), batch_size=batch_size,
                              sampling=dataclasses.replace(settings.sampling,
                                                           temperature=float(temperature)))
    results = evaluate(run.student, run.tokenizer, datasets, config=cfg)
    path = run.workdir / "eval" / f"temperature_{temperature:g}.json"
    path.parent.mkdir(exist_ok=True)
    write_results(results, path)
    written.append(path)
  return written


def fidelity_diversity(workdir: PathLike) -> dict[str, list[tuple[float, float, float]]]:
  """(temperature, ROUGE-L, Self-BLEU) per dataset, by temperature, from the sweep's
  W/eval/temperature_<T>.json (not the step_<N>.json of evaluation during training)."""
  curves: dict[str, list[tuple[float, float, float]]] = {}
  for path in sorted(paths.as_path(workdir).joinpath("eval").glob("temperature_*.json")):
    for name, row in json.loads(path.read_text()).items():
      if "sampling" in row and "self_bleu" in row:
        curves.setdefault(name, []).append(
            (row["sampling"]["temperature"], row["rougeL"], row["self_bleu"]))
  return {name: sorted(set(points)) for name, points in curves.items()}
