"""Real weights: Gemma 3 270M (`gemma3_text`, converted from its GGUF) against transformers.

The converted directory must hold what transformers' own GGUF loader reads from the same file
(norms with llama.cpp's +1 undone, q/k rows not permuted, tied embedding), load in transformers
and in csd-jax, and give the same logits and greedy answers in float32 on CPU, unsharded and
on an 8-device (data, fsdp, tensor) mesh. Tolerance: max |difference| <= 1e-4 x max |logit|,
float32 rounding of different matmul and reduction orders over 18 layers and a 262k-wide head
(measured: about 2.5e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from csd_jax.models import generate, load_pretrained
from csd_jax.runtime.sharding import make_mesh

TOL = 1e-4
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.",
           "Explain volcanoes to a child in two sentences."]


@pytest.fixture(scope="module")
def models(gemma3_dir):
  reference = transformers.AutoModelForCausalLM.from_pretrained(gemma3_dir,
                                                                dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(gemma3_dir)
  return load_pretrained(gemma3_dir), reference, tokenizer


def _chat_ids(tokenizer, prompt: str) -> np.ndarray:
  return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, return_tensors="np",
                                       return_dict=True)["input_ids"]


def _max_rel(got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_converted_config(gemma3_dir):
  import json

  config = json.loads((gemma3_dir / "config.json").read_text())
  assert config["model_type"] == "gemma3_text"
  assert config["architectures"] == ["Gemma3ForCausalLM"]
  assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
      18, 640, 262144)
  assert (config["head_dim"], config["query_pre_attn_scalar"], config["sliding_window"]) == (
      256, 256, 512)
  assert config["layer_types"][4:6] == ["sliding_attention", "full_attention"]
  assert config["layer_types"].count("full_attention") == 3
  assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
  assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"]
  generation = json.loads((gemma3_dir / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [1, 106]   # <eos>, <end_of_turn>


@pytest.mark.slow
def test_converted_weights_model_english(models):
  """A wrong conversion (norms without llama.cpp's +1 undone, permuted q/k rows) garbles the
  model: plain English then costs ~10 nats a token. (The converted tensors were also checked
  bit for bit against transformers' own GGUF loader, which takes a minute: see the README.)"""
  ours, _, tokenizer = models
  text = ("The sun is the star at the centre of the solar system. It is a nearly perfect ball "
          "of hot plasma, and it is by far the most important source of energy for life on "
          "Earth.")
  ids = np.asarray([tokenizer(text)["input_ids"]])
  assert ids[0, 0] == 2   # <bos>
  logp = jax.nn.log_softmax(ours(jnp.asarray(ids))[0, :-1].astype(jnp.float32))
  nll = -float(jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), -1).mean())
  assert nll < 3.0, nll


def test_tokenizer_and_chat_template(models):
  _, _, tokenizer = models
  text = tokenizer.apply_chat_template(
      [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi  there"},
       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "déjà vu?"}],
      add_generation_prompt=True, tokenize=False)
  assert text == ("<bos><start_of_turn>user\nBe terse.\n\nHi  there<end_of_turn>\n"
                  "<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\ndéjà vu?"
                  "<end_of_turn>\n<start_of_turn>model\n")
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert ids[0] == 2 and ids.count(105) == 4 and ids.count(106) == 3   # specials stay whole
  assert tokenizer.decode(ids) == text
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)


def test_chat_prompts_logits_match_transformers(models):
  ours, reference, tokenizer = models
  texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in PROMPTS]
  enc = tokenizer(texts, return_tensors="np", padding=True, padding_side="right",
                  add_special_tokens=False)
  ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
  with torch.no_grad():
    ref = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids)))   # causal: right padding leaves real tokens alone
  assert _max_rel(got[mask], ref[mask]) <= TOL


@pytest.mark.slow
def test_greedy_answer_matches_transformers(models):
  ours, reference, tokenizer = models
  ids = _chat_ids(tokenizer, PROMPTS[2])
  eos = [1, 106]
  with torch.no_grad():
    ref = reference.generate(torch.tensor(ids), max_new_tokens=20, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].numpy()
  got = np.asarray(generate(ours, ids, max_new_tokens=20, eos_id=eos))[0]
  np.testing.assert_array_equal(got[:len(ref)], ref)


def test_sharded_load_on_an_8_device_mesh_equals_unsharded(models, gemma3_dir):
  ours, _, tokenizer = models
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_pretrained(gemma3_dir, mesh=mesh)
  assert "tensor" in str(sharded.embed[...].sharding.spec)   # 262144 rows split
  ids = np.concatenate([_chat_ids(tokenizer, PROMPTS[0])] * 2)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda m, x: m(x))(sharded, jnp.asarray(ids))
  # Sharded matmuls sum partial products in another order: float32 rounding, same metric.
  assert _max_rel(got, ours(jnp.asarray(ids))) <= TOL
