"""The task-specific recipe: the configs set what the official ones set (aailab-kaist/CSD
task_specific_distillation/config/), and speculative_kd's files are training data."""

import json
import pathlib

import pytest

from csd_jax.config import load_config
from csd_jax.data import tfds_builder
from csd_jax.data.instruct import load_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "speculative_kd"
# config: (max_length, max_prompt_length, epochs, CSD weights) of kd_train_{gsm,summ,mt}.yaml
DISTILLATION = {
    "gemma_7b_it_to_2b_it_gsm8k.yaml": (768, 256, 3, ("teacher", "student")),
    "gemma_7b_it_to_2b_it_summ.yaml": (1152, 1024, 3, (0.15, 0.15)),
    "gemma_7b_it_to_2b_it_mt.yaml": (512, 256, 10, ("teacher", "student")),
}
# config: (max_length, epochs) of sft_config_{gsm,summ,trans}_teacher.yaml
SFT = {"gemma_7b_it_sft_gsm8k.yaml": (768, 3), "gemma_7b_it_sft_summ.yaml": (1152, 3),
       "gemma_7b_it_sft_mt.yaml": (256, 10)}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """No hub: loading a config must not fetch anything."""
  from huggingface_hub import constants

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name", sorted(DISTILLATION))
def test_distillation_configs_follow_the_official_runs(name):
  config = load_config(ROOT / "configs" / name)
  max_length, max_prompt, epochs, weights = DISTILLATION[name]
  assert config.student.path == "google/gemma-2b-it" and config.teacher.dtype == "bfloat16"
  assert (config.loss.name, config.loss.normalize) == ("csd", "sequence")
  assert (config.loss.params["w1"], config.loss.params["w2"]) == weights
  optim, train, data = config.optim, config.train, config.data
  assert (optim.lr, optim.schedule, optim.warmup_steps, optim.end_lr) == (1e-5, "linear", 0, 0.0)
  assert (optim.weight_decay, optim.clip_norm) == (0.01, 1.0)
  assert (train.batch_size, train.epochs, train.seed, train.heldout_every) == (8, epochs, 20, 25)
  assert (data.max_length, data.max_prompt_length, data.keep_prompt) == (max_length, max_prompt,
                                                                         "start")
  assert data.template == "chat" and data.source == "files" and not data.pack


@pytest.mark.parametrize("name", sorted(SFT))
def test_sft_teacher_configs_follow_the_official_runs(name):
  config = load_config(ROOT / "configs" / name)
  max_length, epochs = SFT[name]
  assert config.teacher is None and config.student.path == "google/gemma-7b-it"
  assert (config.loss.kd_coef, config.loss.ce_coef) == (0.0, 1.0)
  optim = config.optim
  assert (optim.lr, optim.schedule, optim.warmup_ratio, optim.weight_decay) == (
      1e-5, "cosine", 0.1, 0.0)
  assert (config.train.batch_size, config.train.epochs, config.train.seed) == (128, epochs, 42)
  assert config.data.max_length == max_length and config.data.pack


@pytest.mark.parametrize("name,fields", [
    ("gsm_1k_train.json", ("instruction", "response")),
    ("summ_1k_train.json", ("dialogue", "summary")),
    ("mt_1k_train.json", ("instruction", "response")),
])
def test_speculative_kd_files_are_training_data(name, fields, tmp_path):
  """As training reads them (the TFDS builder of data.source=files): the Dolly form."""
  source = tfds_builder.instruction_files({"train": [FIXTURES / name]}, tmp_path / "tfds")["train"]
  records = [{k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
             for i in range(len(source))]
  raw = json.loads((FIXTURES / name).read_text())["instances"]
  expected = sorted((r[fields[0]], "", r[fields[1]]) for r in raw)
  assert sorted((r["instruction"], r["context"], r["response"]) for r in records) == expected
  assert len(load_records(FIXTURES / name)) == len(raw)
