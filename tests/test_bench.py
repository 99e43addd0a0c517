"""bench/loss.py runs end to end (a smoke test: no timing is asserted)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_loss_runs_and_prints_every_row():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "loss.py"), "--sizes", "tiny", "--chunk-size", "64",
       "--repeats", "1"], capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith("256 x 1024")]
  assert [row.split()[4] for row in rows] == ["csd", "fkl"]
  csd_row = rows[0].split()
  assert float(csd_row[-1]) > 0  # the torch baseline ran beside it


def test_bench_models_runs():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "models.py"), "--sizes", "tiny", "--repeats", "1"],
      capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  row = [line for line in result.stdout.splitlines() if line.startswith("gpt2-tiny")]
  assert len(row) == 1 and float(row[0].split()[3].replace(",", "")) > 0


def test_bench_data_runs(gpt2_tokenizer, tmp_path):
  gpt2_tokenizer.save_pretrained(tmp_path)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "data.py"), "--bpe-dir", str(tmp_path),
       "--records", "200", "--batches", "5"],
      capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  rows = {line.rsplit(None, 2)[0]: line.split()[-1] for line in result.stdout.splitlines()
          if line.startswith(("pad to", "buckets", "packing"))}
  assert set(rows) == {"pad to max_length", "buckets of 64", "packing"}
  assert float(rows["packing"].rstrip("%")) < float(rows["pad to max_length"].rstrip("%"))


def test_bench_step_runs_beside_the_torch_baseline():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "step.py"), "--sizes", "tiny", "--repeats", "1"],
      capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  row = [line for line in result.stdout.splitlines() if line.startswith("gpt2-tiny")]
  assert len(row) == 1
  fields = row[0].split()
  assert float(fields[2].replace(",", "")) > 0 and float(fields[6].replace(",", "")) > 0


@pytest.mark.slow
def test_bench_levers_runs_every_lever():
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "levers.py"), "--sizes", "tiny", "--repeats", "1"],
      capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  measured = [line for line in lines[2:] if "GPU only" not in line]
  assert len(measured) == 6 and not any("failed" in line for line in measured), result.stdout
  assert measured[0].split()[-2:] == ["1.00", "1.00"]          # the baseline against itself
  unfused = next(line for line in measured if line.startswith("unfused loss"))
  assert float(unfused.split()[-1]) > 1.0, unfused   # materialised logits cost memory


def test_benches_and_the_step_import_without_data_packages():
  """The GPU host has no grain, tensorflow-datasets or rouge-score (DESIGN.md)."""
  code = ("import sys\n"
          "for m in ('grain', 'tensorflow_datasets', 'rouge_score'): sys.modules[m] = None\n"
          "import runpy\n"
          "for b in ('loss', 'models', 'step', 'levers'): runpy.run_path('bench/%s.py' % b)\n"
          "import csd_jax.train.step, csd_jax.run.state, csd_jax.run.models\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
                          timeout=300)
  assert result.returncode == 0, result.stderr


def test_bench_step_memory_only_compiles_fused_and_unfused():
  """--memory-only compiles the step on abstract inputs (nothing runs) and prints both
  paths' temporaries side by side."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "step.py"), "--memory-only", "--sizes", "tiny"],
      capture_output=True, text=True, env=env, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  row = [line for line in result.stdout.splitlines() if line.startswith("gpt2-tiny")]
  assert len(row) == 1, result.stdout
  assert float(row[0].split()[6]) > 0  # fused / unfused temporaries


def test_bench_presets_build_with_their_real_sizes():
  from bench.presets import MODELS, PAIRS, shared_vocab
  from csd_jax.models import config_from_hf

  for teacher, student, _, _ in PAIRS["paper"].values():
    for hf in (teacher, student):
      config_from_hf(hf)
  qwen_teacher, qwen_student, batch, seq = PAIRS["paper"]["qwen2.5-7b->1.5b"]
  assert (shared_vocab(qwen_teacher, qwen_student), batch, seq) == (151936, 4, 1024)
  gemma2 = config_from_hf(PAIRS["paper"]["gemma-2-9b->2b"][0])
  assert (gemma2.hidden_size, gemma2.num_layers, gemma2.final_logit_softcap,
          gemma2.sliding_window) == (3584, 42, 30.0, 4096)
  assert {name for name, *_ in MODELS["paper"]} >= {"qwen2.5-7b", "gemma-2-9b", "gemma-2-2b"}
