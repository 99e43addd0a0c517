"""`csd-jax train` errors: one line on stderr naming the problem and the fix, exit 2, no traceback;
every shipped config is valid."""

import pathlib
import subprocess
import sys

import pytest

from csd_jax.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _train(*args, workdir):
  """The real entry point, in a new interpreter."""
  return subprocess.run([sys.executable, "-m", "csd_jax.cli", "train", *args, "--workdir",
                         str(workdir)], capture_output=True, text=True, check=False, cwd=ROOT,
                        timeout=300)


def _assert_one_line(code, stderr, message):
  assert code == 2, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("csd-jax train:")]
  assert len(errors) == 1 and message in errors[0], stderr
  assert "Traceback" not in stderr


@pytest.mark.parametrize("args,message", [
    (["--config", TINY, "train.stepz=3"],
     "unknown config key 'train.stepz'; did you mean train.steps"),
    (["--config", TINY, "train.steps=many"], "train.steps='many': expected int"),
    (["--config", TINY, "optim.schedule=exp"], "optim.schedule='exp': valid: cosine, linear"),
    (["--config", TINY, "loss.name=kld"], "unknown loss 'kld'; valid losses: csd"),
    (["--config", TINY, "loss.params.lam=0.5"], "unknown parameter(s) lam for loss 'csd'"),
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml does not exist"),
    (["--config", TINY, "mesh.data=3"], "mesh data=3, fsdp=1, tensor=1 needs 3 devices, found 8"),
    (["--config", TINY, "train.grad_accum=3"], "train.batch_size=8 does not divide into"),
    (["--config", TINY, "train.grad_accum=2"], "micro-batches of 4 rows (train.batch_size / "
                                               "train.grad_accum) do not split over the 8"),
    (["--config", TINY, "teacher.path=/nonexistent", "teacher.config=null"],
     "/nonexistent is not a model directory"),
])
def test_errors_are_one_line(args, message, tmp_path, run_cli):
  code, _, err = run_cli("train", *args, "--workdir", tmp_path / "w", cwd=ROOT)
  _assert_one_line(code, err, message)
  assert not (tmp_path / "w").exists()


def test_an_error_from_the_real_entry_point_is_one_line(tmp_path):
  result = _train("--config", TINY, "train.stepz=3", workdir=tmp_path / "w")
  _assert_one_line(result.returncode, result.stderr, "unknown config key 'train.stepz'")


def test_different_tokenizers_are_refused(tmp_path, gpt2_tokenizer, converted, run_cli):
  from hf_tiny import make_checkpoint

  teacher = tmp_path / "teacher"
  make_checkpoint("gpt2_n_inner", teacher)
  gpt2_tokenizer.save_pretrained(teacher)
  code, _, err = run_cli("train", "--config", TINY, f"teacher.path={teacher}",
                         "teacher.config=null", f"student.path={converted}", "student.config=null",
                         "--workdir", tmp_path / "w")
  _assert_one_line(code, err, "use different tokenizers")


def test_paper_hyper_parameters():
  gpt2 = load_config(ROOT / "configs" / "gpt2_xl_to_gpt2_dolly.yaml")
  assert (gpt2.optim.lr, gpt2.train.batch_size, gpt2.train.epochs, gpt2.optim.end_lr) == (
      1e-4, 8, 20, 1e-7)
  assert gpt2.loss.params == {"w1": "student", "w2": "student", "temperature": 1.0}
  llama = load_config(ROOT / "configs" / "openllama_7b_to_3b_dolly_lora.yaml")
  assert (llama.lora.rank, llama.lora.alpha, llama.lora.dropout) == (16, 64, 0.1)
  gemma = load_config(ROOT / "configs" / "gemma_7b_it_to_2b_it_gsm8k.yaml")
  assert gemma.loss.params["w1"] == "teacher" and gemma.train.batch_size == 8  # grad_acc_size 8
  assert (gemma.optim.schedule, gemma.data.max_length, gemma.loss.normalize) == (
      "linear", 768, "sequence")
  with pytest.raises(ConfigError, match="loss.lm_coef > 0 needs data.lm_files"):
    load_config(ROOT / "configs" / "tiny.yaml", ["loss.lm_coef=0.5"])
