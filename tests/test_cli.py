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
