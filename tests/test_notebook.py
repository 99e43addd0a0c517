"""notebooks/inspect_losses.ipynb runs headless on two tiny runs (CSD and FKL, instruction files
and the real GPT-2 tokenizer) and saves every figure."""

import json
import os
import pathlib

import nbclient
import nbformat
import pytest

from csd_jax.config import load_config
from csd_jax.eval import loss_inspection as inspection
from csd_jax.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_tokenizer):
  base = tmp_path_factory.mktemp("inspect")
  gpt2_tokenizer.save_pretrained(base / "tokenizer")
  records = [{"instruction": f"Name colour {i}.", "context": "", "response": f"Colour {i} is blue."}
             for i in range(24)]
  (base / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records[:20]))
  (base / "test.jsonl").write_text("\n".join(json.dumps(r) for r in records[20:]))
  workdirs = {}
  # Trained with paths relative to `base`, opened (by the notebook) from another directory.
  cwd = os.getcwd()
  os.chdir(base)
  try:
    for loss in ("csd", "fkl"):
      workdirs[loss] = base / loss
      train(load_config(TINY, [
          "teacher.config.vocab_size=50257", "student.config.vocab_size=50257",
          "data.source=files", "data.train_files=[train.jsonl]", "data.eval_files=[test.jsonl]",
          "data.tokenizer=tokenizer", "data.data_dir=tfds", "data.max_prompt_length=12",
          f"loss.name={loss}", "train.steps=6", "train.heldout_every=3"]), loss)
  finally:
    os.chdir(cwd)
  return base, workdirs


@pytest.mark.slow
def test_token_report_matches_the_run(runs):
  _, workdirs = runs
  run = inspection.open_run(workdirs["csd"])
  report = inspection.token_report(run, top=5)
  targets = run.batch["labels"] != -100
  assert report["per_token"].shape == targets.shape
  assert (~targets == (report["per_token"] != report["per_token"])).all()  # NaN off targets
  assert (report["per_token"][targets] >= 0).all()
  vocab = 50257
  assert report["student_probs"].size == targets.sum() * vocab
  # the residual is centred on E_q[d] at every target: its q-weighted mean is 0
  q = report["student_probs"].reshape(-1, vocab)
  centred = (q * report["residual"].reshape(-1, vocab)).sum(-1)
  assert abs(centred).max() < 1e-3   # float32 sums over 50257 entries
  scores = [r["csd"] for r in report["disagreements"]]
  assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(
      float(report["per_token"][targets].max()))


@pytest.mark.slow
def test_the_notebook_executes_and_saves_its_figures(runs, tmp_path, monkeypatch):
  base, workdirs = runs
  figures = tmp_path / "figures"
  for key, value in ({
      "CSD_INSPECT_RUNS": ",".join(f"{k}={v}" for k, v in workdirs.items()),
      "CSD_INSPECT_SWEEP_DATA": str(base / "test.jsonl"),
      "CSD_INSPECT_TEMPERATURES": "0.5,1.5", "CSD_INSPECT_SWEEP_EXAMPLES": "3",
      "CSD_INSPECT_FIGURES": str(figures), "MPLBACKEND": "Agg"}).items():
    monkeypatch.setenv(key, value)   # the kernel inherits the environment
  notebook = nbformat.read(ROOT / "notebooks" / "inspect_losses.ipynb", as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  for name in ("loss_curves.png", "token_heatmap.png", "histograms.png",
               "fidelity_diversity.png", "disagreements.json"):
    assert (figures / name).stat().st_size > 1000 or name.endswith(".json"), name
  assert len(json.loads((figures / "disagreements.json").read_text())) == 10
  step_file = workdirs["csd"] / "eval" / "step_6.json"   # evaluation during training
  step_file.write_text((workdirs["csd"] / "eval" / "temperature_0.5.json").read_text())
  for loss in workdirs:
    curve = inspection.fidelity_diversity(workdirs[loss])["sweep"]
    assert [point[0] for point in curve] == [0.5, 1.5]
    # the held-out curves compare every run on the same measures, at every period
    for key in ("eval_kl", "eval_csd"):
      assert inspection.loss_curves({loss: workdirs[loss]}, key)[loss][0] == [3, 6]


def test_token_report_on_packed_rows_equals_the_rows_apart():
  """Segment ids in the mask and restarting positions: each packed segment is scored as it
  would be alone."""
  import numpy as np

  from csd_jax.models import init_random

  gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 16}
  teacher = init_random({**gpt2, "n_layer": 2}, seed=1)
  student = init_random({**gpt2, "n_layer": 1}, seed=2)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 64, 6), rng.integers(0, 64, 5)
  labels = lambda n: np.arange(n) % 3 != 0  # noqa: E731 (some positions are not targets)

  def batch(rows, segments, positions, targets):
    ids = np.stack(rows).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.stack(segments).astype(np.int32),
            "positions": np.stack(positions).astype(np.int32),
            "labels": np.where(np.stack(targets), ids, -100).astype(np.int32)}

  packed = batch([np.concatenate([a, b])], [np.r_[np.ones(6), 2 * np.ones(5)]],
                 [np.r_[np.arange(6), np.arange(5)]], [np.r_[labels(6), labels(5)]])
  apart = batch([a, np.r_[b, 0]], [np.ones(6), np.r_[np.ones(5), 0]],
                [np.arange(6), np.r_[np.arange(5), 0]], [labels(6), np.r_[labels(5), False]])
  reports = [inspection.token_report(inspection.Run(pathlib.Path("."), None, 0, student,
                                                    teacher, None, 64, b_))
             for b_ in (packed, apart)]
  got, want = reports[0]["per_token"][0], reports[1]["per_token"]
  # float32: the same sums over 64 entries, in rows of another length
  np.testing.assert_allclose(got, np.r_[want[0], want[1, :5]], rtol=1e-5, atol=1e-7)
