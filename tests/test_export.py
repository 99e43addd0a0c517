"""`csd-jax export`: transformers loads the exported student, logits equal ours; LoRA merged."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from csd_jax.config import load_config
from csd_jax.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize("extra", [[], ["lora.rank=4", "lora.targets=[q, v, up]"]],
                         ids=["full", "lora"])
def test_exported_student_loads_in_transformers_with_equal_logits(tmp_path, extra, run_cli):
  config = load_config(TINY, ["train.steps=4", "student.dtype=float32", "optim.lr=3e-2", *extra])
  result = train(config, tmp_path / "run")
  out = tmp_path / "hf"
  code, stdout, stderr = run_cli("export", "--workdir", tmp_path / "run", "--out", out)
  assert code == 0, stderr
  assert "wrote the student of step 4" in stdout
  ids = np.random.default_rng(0).integers(0, 256, (2, 20))
  ours = np.asarray(result.student(jnp.asarray(ids)))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  with torch.no_grad():
    ref = reloaded(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4  # float32 rounding
  untrained = load_config(TINY).student.config
  assert transformers.AutoConfig.from_pretrained(out).n_embd == untrained["n_embd"]


def test_export_errors(tmp_path, run_cli):
  code, _, err = run_cli("export", "--workdir", tmp_path, "--out", tmp_path / "o")
  assert code == 2 and "has no config.yaml" in err
  assert "Traceback" not in err


def test_exported_generation_config_lists_every_stop_id(tmp_path, converted):
  """The exported student stops where training and evaluation stopped: the tokenizer's eos
  and end of turn, and every eos id the run's models declare, over the student's own
  generation settings."""
  from types import SimpleNamespace

  from csd_jax.train.export import _write_generation_config

  tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
  config = SimpleNamespace(student=SimpleNamespace(path=str(converted), config=None),
                           teacher=SimpleNamespace(path=None, config={"eos_token_id": [5, 7]}))
  _write_generation_config(tmp_path, config, tokenizer)
  written = transformers.GenerationConfig.from_pretrained(tmp_path)
  assert written.eos_token_id[0] == tokenizer.eos_token_id
  assert {5, 7} <= set(written.eos_token_id)
  original = transformers.GenerationConfig.from_pretrained(converted)
  assert written.bos_token_id == original.bos_token_id
