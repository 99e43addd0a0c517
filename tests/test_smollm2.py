"""Real weights: SmolLM2-135M-Instruct (converted from its GGUF) against transformers' PyTorch model.

float32 on CPU; the tolerance is float32 rounding of different matmul orders over 30 layers.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from csd_jax.models import generate, load_pretrained

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small"]


@pytest.fixture(scope="module")
def models(converted):
  reference = transformers.AutoModelForCausalLM.from_pretrained(converted).float().eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
  return load_pretrained(converted), reference, tokenizer


def test_real_prompts_logits_match_transformers(models):
  ours, reference, tokenizer = models
  for prompt in PROMPTS:
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    with torch.no_grad():
      ref = reference(torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, (prompt, rel)


def test_greedy_chat_answer_matches_transformers(models):
  ours, reference, tokenizer = models
  messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np",
                                      return_dict=True)["input_ids"]
  eos = tokenizer.eos_token_id
  with torch.no_grad():
    ref = reference.generate(torch.tensor(ids), max_new_tokens=16, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].numpy()
  got = np.asarray(generate(ours, ids, max_new_tokens=16, eos_id=eos))[0]
  got = got[:len(ref)]
  np.testing.assert_array_equal(got, ref)
  assert "Paris" in tokenizer.decode(got)
