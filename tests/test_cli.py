"""The command line: the demo runs the real loss code and lowers the loss; bad input fails."""

import subprocess
import sys

import pytest

from csd_jax import cli, demo


@pytest.mark.parametrize("loss", ["csd", "fkl"])
def test_demo_lowers_the_loss(loss):
  first, last = demo.run(steps=25, loss=loss, log_every=25)
  assert last < 0.9 * first


def test_cli_demo_exit_code_and_progress(capsys):
  assert cli.main(["demo", "--steps", "20"]) == 0
  out = capsys.readouterr().out
  assert "step   20/20" in out and "tokens/s" in out and "done: csd went from" in out


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
