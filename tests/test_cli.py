"""The command line: bad arguments fail with a clear message."""

import subprocess
import sys


def test_cli_rejects_unknown_loss():
  result = subprocess.run([sys.executable, "-m", "csd_jax.cli", "demo", "--loss", "kld"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert "invalid choice: 'kld'" in result.stderr


def test_cli_convert_gguf_reports_a_missing_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "csd_jax.cli", "convert-gguf",
                           str(tmp_path / "missing.gguf"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert "csd-jax convert-gguf:" in result.stderr and "missing.gguf" in result.stderr
  assert not (tmp_path / "out").exists()


def test_cli_report_prints_the_table_and_names_a_missing_run(tmp_path):
  import json

  run = tmp_path / "csd"
  run.mkdir()
  (run / "eval_results.json").write_text(json.dumps({"dolly": {
      "rougeL": 21.0, "rougeL_per_seed": [20.0, 22.0], "samples": {"10": [], "20": []}}}))
  result = subprocess.run([sys.executable, "-m", "csd_jax.cli", "report", str(run),
                           "--out", str(tmp_path / "t.md")],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "| csd | 21.00 ± 1.41 |" in result.stdout and (tmp_path / "t.csv").is_file()
  result = subprocess.run([sys.executable, "-m", "csd_jax.cli", "report",
                           str(tmp_path / "absent")], capture_output=True, text=True, check=False)
  assert result.returncode == 2 and "absent" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
