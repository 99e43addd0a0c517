"""The shipped configs: each loads and passes the config checks offline, and its mesh fits one
8-device host; today's chat pairs are set up as documented (chat template, bf16, remat, LoRA)."""

import pathlib

import pytest

from csd_jax.config import load_config
from csd_jax.data.chat import run_model_stop_ids
from csd_jax.runtime.sharding import data_parallel_size, make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CHAT_PAIRS = {
    "qwen2.5_7b_to_1.5b_instruct.yaml": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
    "gemma2_9b_to_2b_it.yaml": ("google/gemma-2-9b-it", "google/gemma-2-2b-it"),
    "llama3.1_8b_to_3.2_1b.yaml": ("meta-llama/Llama-3.1-8B-Instruct",
                                   "meta-llama/Llama-3.2-1B-Instruct"),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """No hub: loading a config must not fetch anything (an empty cache, offline mode)."""
  from huggingface_hub import constants

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_fits_an_8_device_host(path):
  config = load_config(path)   # parsing and every cross-field check (csd_jax.config.checks)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  assert mesh.devices.size == 8
  train = config.train
  assert train.batch_size % train.grad_accum == 0
  if config.data.source != "synthetic":   # the demo and test configs may run on one chip
    assert (train.batch_size // train.grad_accum) % data_parallel_size(mesh) == 0
  assert run_model_stop_ids(config) is not None   # hub ids not cached: nothing, no fetch


def test_the_chat_pairs_exist():
  assert set(CHAT_PAIRS) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(CHAT_PAIRS))
def test_chat_pairs_settings(name):
  config = load_config(ROOT / "configs" / name)
  assert (config.teacher.path, config.student.path) == CHAT_PAIRS[name]
  assert config.data.template == "chat" and config.data.tokenizer is None   # the teacher's
  assert config.teacher.dtype == config.student.dtype == "bfloat16"
  assert config.student.param_dtype == "float32" and config.student.remat != "none"
  assert config.lora.rank > 0 and set(config.lora.targets) == {"q", "k", "v", "o", "gate",
                                                               "up", "down"}
  assert config.loss.name == "csd" and config.loss.fused
  assert run_model_stop_ids(config) == ()   # hub ids without a cache: nothing read


def test_overrides_still_apply_to_the_chat_pairs():
  config = load_config(ROOT / "configs" / "qwen2.5_7b_to_1.5b_instruct.yaml",
                       ["lora.rank=0", "mesh.data=-1", "mesh.fsdp=1", "onpolicy.ratio=0.5"])
  assert config.lora.rank == 0 and config.onpolicy.ratio == 0.5
  assert make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor).devices.size == 8


@pytest.mark.parametrize("name", ["gpt2_xl_sft_dolly.yaml", "gpt2_sft_dolly.yaml",
                                  "openllama2_7b_sft_dolly_lora.yaml"])
def test_the_sft_configs_train_without_a_teacher(name):
  config = load_config(ROOT / "configs" / name)
  assert config.teacher is None and config.loss.kd_coef == 0 and config.loss.ce_coef == 1
  assert config.data.source == "minillm" and config.eval.select == "valid"


@pytest.mark.parametrize("name", ["gpt2_xl_to_gpt2_imitkd_csd_dolly.yaml",
                                  "gpt2_xl_to_gpt2_medium_imitkd_csd_dolly.yaml",
                                  "openllama_7b_to_3b_imitkd_csd_dolly_lora.yaml"])
def test_the_table_2_configs_mix_as_distillm_with_the_lm_term(name):
  config = load_config(ROOT / "configs" / name)
  assert (config.onpolicy.mix, config.onpolicy.ratio, config.loss.lm_coef) == ("distillm", 1.0,
                                                                               1.0)
  assert config.data.lm_files and config.data.max_length == 512


def test_openllama_is_v2_with_lora_on_q_and_v():
  for name in ("openllama_7b_to_3b_dolly_lora.yaml", "openllama2_7b_sft_dolly_lora.yaml"):
    config = load_config(ROOT / "configs" / name)
    assert config.student.path.endswith("_v2") and config.lora.targets == ["q", "v"]
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (16, 64, 0.1)


def test_the_compile_cache_default_honours_the_environment(monkeypatch):
  monkeypatch.setenv("CSD_JAX_COMPILE_CACHE", "/shared/xla")
  tiny = ROOT / "configs" / "tiny.yaml"
  assert load_config(tiny).train.compile_cache == "/shared/xla"
  assert load_config(tiny, ["train.compile_cache=workdir"]).train.compile_cache == "workdir"
  monkeypatch.delenv("CSD_JAX_COMPILE_CACHE")
  assert load_config(tiny).train.compile_cache == "workdir"
