"""The NNX ports against transformers' PyTorch models: logits, padding, export, cache, generate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csd_jax.errors import UserError
from csd_jax.models import generate, init_random, load_pretrained, save_pretrained
from csd_jax.runtime.sharding import make_mesh, state_shardings
from hf_tiny import CONFIGS, VOCAB, make_checkpoint

TOL = 1e-4  # max relative error, float32 (rounding only: different matmul orders)


def _max_rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def _checkpoint(name, tmp_path_factory):
  directory = tmp_path_factory.mktemp(name)
  return name, directory, make_checkpoint(name, directory)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
  """Every family: the port's own tests (logits, padding, export, cache, greedy, sharding)."""
  return _checkpoint(request.param, tmp_path_factory)


# Sampling, n-gram bans, stopping and row splitting do not depend on the family: they run on
# learned positions, RoPE with GQA, and soft-capped sliding-window attention.
SAMPLER_FAMILIES = ("gpt2_n_inner", "llama_gqa_untied_bias", "gemma2_softcaps")


@pytest.fixture(scope="module", params=SAMPLER_FAMILIES)
def sampler(request, tmp_path_factory):
  return _checkpoint(request.param, tmp_path_factory)


def _ids(shape, seed=0):
  return np.random.default_rng(seed).integers(3, VOCAB, shape)


def test_logits_match_transformers(tiny):
  _, directory, torch_model = tiny
  ids = _ids((2, 40))
  with torch.no_grad():
    ref = torch_model(torch.tensor(ids)).logits.numpy()
  assert _max_rel(load_pretrained(directory)(jnp.asarray(ids)), ref) <= TOL


def test_left_and_right_padding_leave_real_tokens_unchanged(tiny):
  _, directory, _ = tiny
  model = load_pretrained(directory)
  lengths = [9, 5]
  seqs = [_ids((n,), seed=n) for n in lengths]
  alone = [np.asarray(model(jnp.asarray(s[None])))[0] for s in seqs]
  width = max(lengths) + 3
  for side in ("left", "right"):
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, s in enumerate(seqs):
      where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
      ids[i, where], mask[i, where] = s, 1
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    for i, s in enumerate(seqs):
      where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
      assert _max_rel(logits[i, where], alone[i]) <= TOL, side


def test_export_round_trip_loads_in_transformers(tiny, tmp_path):
  _, directory, _ = tiny
  model = load_pretrained(directory)
  save_pretrained(model, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
  ids = _ids((2, 17), seed=3)
  with torch.no_grad():
    ref = reloaded(torch.tensor(ids)).logits.numpy()
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids))),
                                np.asarray(load_pretrained(tmp_path)(jnp.asarray(ids))))
  assert _max_rel(model(jnp.asarray(ids)), ref) <= TOL


def test_kv_cache_decoding_equals_full_forward(tiny):
  _, directory, _ = tiny
  model = load_pretrained(directory)
  ids = jnp.asarray(_ids((2, 12), seed=4))
  mask = jnp.ones_like(ids).at[1, :3].set(0)  # the second sequence is left-padded
  full = np.asarray(model(ids, mask))
  kv_valid = mask
  cache = model.init_cache(2, 12)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  hidden, cache = model.hidden_states(ids[:, :5], mask[:, :5], positions[:, :5], cache=cache,
                                      cache_index=0, kv_valid=kv_valid)
  steps = [np.asarray(model.logits(hidden))]
  for t in range(5, 12):
    hidden, cache = model.hidden_states(ids[:, t:t + 1], None, positions[:, t:t + 1],
                                        cache=cache, cache_index=t, kv_valid=kv_valid)
    steps.append(np.asarray(model.logits(hidden)))
  stepped = np.concatenate(steps, axis=1)
  assert _max_rel(stepped[0], full[0]) <= TOL
  assert _max_rel(stepped[1, 3:], full[1, 3:]) <= TOL


def test_greedy_generate_equals_transformers(tiny):
  name, directory, torch_model = tiny
  prompts = [_ids((7,), seed=5), _ids((4,), seed=6)]
  ids = np.zeros((2, 7), np.int64)
  mask = np.zeros((2, 7), np.int64)
  for i, p in enumerate(prompts):
    ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=10, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[:, 7:].numpy()
  ours = np.asarray(generate(load_pretrained(directory), ids, prompt_mask=mask,
                             max_new_tokens=10))
  np.testing.assert_array_equal(ours, ref, err_msg=name)


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_equals_transformers(sampler, n):
  """A random tiny model repeats itself at once under greedy decoding: the ban must bite, and
  pick the same tokens as transformers' `no_repeat_ngram_size`."""
  name, directory, torch_model = sampler
  ids = _ids((2, 6), seed=9)
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), max_new_tokens=24, do_sample=False,
                               no_repeat_ngram_size=n, pad_token_id=0,
                               eos_token_id=None)[:, 6:].numpy()
  model = load_pretrained(directory)
  ours = np.asarray(generate(model, ids, max_new_tokens=24, no_repeat_ngram_size=n))
  np.testing.assert_array_equal(ours, ref, err_msg=name)
  if n == 2:  # bigrams repeat within 24 greedy tokens of every tiny model; trigrams not always
    plain = np.asarray(generate(model, ids, max_new_tokens=24))
    assert not np.array_equal(plain, ours), "the ban never changed a token: the test is void"
  for row in np.concatenate([ids, ours], 1).tolist():
    grams = [tuple(row[j:j + n]) for j in range(len(row) - n + 1)]
    assert len(grams) == len(set(grams))


def test_no_repeat_ngram_ignores_left_padding(sampler):
  """A left-padded prompt generates what it generates alone: padding is not text."""
  _, directory, _ = sampler
  model = load_pretrained(directory)
  prompt = _ids((1, 4), seed=11)
  padded = np.concatenate([np.zeros((1, 3), prompt.dtype), prompt], 1)
  mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 4), np.int64)], 1)
  kwargs = dict(max_new_tokens=16, no_repeat_ngram_size=2, temperature=1.0, seed=3)
  np.testing.assert_array_equal(np.asarray(generate(model, padded, prompt_mask=mask, **kwargs)),
                                np.asarray(generate(model, prompt, **kwargs)))


def test_generate_sampling_is_seeded_and_stops_at_eos(sampler):
  _, directory, _ = sampler
  model = load_pretrained(directory)
  ids = _ids((3, 5), seed=7)
  kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
  a = np.asarray(generate(model, ids, seed=1, **kwargs))
  np.testing.assert_array_equal(a, np.asarray(generate(model, ids, seed=1, **kwargs)))
  assert not np.array_equal(a, np.asarray(generate(model, ids, seed=2, **kwargs)))
  eos = int(a[0, 3])
  stopped = np.asarray(generate(model, ids, seed=1, eos_id=eos, pad_id=0, **kwargs))
  first = int(np.argmax(a[0] == eos))
  np.testing.assert_array_equal(stopped[0, :first + 1], a[0, :first + 1])
  assert (stopped[0, first + 1:] == 0).all()


def test_ngram_wider_than_the_sequence_bans_nothing(sampler):
  _, directory, _ = sampler
  model = load_pretrained(directory)
  ids = _ids((1, 1), seed=3)
  np.testing.assert_array_equal(
      np.asarray(generate(model, ids, max_new_tokens=3, no_repeat_ngram_size=6)),
      np.asarray(generate(model, ids, max_new_tokens=3)))


def test_sample_loop_draws_only_below_vocab_size(sampler):
  from csd_jax.models.generate import sample_loop
  from csd_jax.sampling import Sampling

  _, directory, _ = sampler
  model = load_pretrained(directory)
  ids = jnp.asarray(_ids((4, 3), seed=2), jnp.int32)
  out = sample_loop(model, ids, jnp.ones_like(ids), jax.random.key(0), max_new_tokens=32,
                    sampling=Sampling(temperature=2.0), eos_ids=(), pad_id=0, vocab_size=10)
  assert int(out.max()) < 10 and len(np.unique(np.asarray(out))) > 3


def test_generation_on_a_mesh_splits_rows_and_samples_the_same(sampler):
  """On a 4 x 2 mesh the prompts' rows are split over the data axes (3 rows: padded to 4),
  and the samples equal the single-device ones: the random bits do not depend on sharding."""
  _, directory, _ = sampler
  ids = _ids((3, 5), seed=13)
  kwargs = dict(max_new_tokens=8, temperature=1.0, seed=4)
  single = np.asarray(generate(load_pretrained(directory), ids, **kwargs))
  sharded_model = load_pretrained(directory, mesh=make_mesh(data=4, fsdp=1, tensor=2))
  out = generate(sharded_model, ids, **kwargs)
  assert out.shape == (3, 8)
  np.testing.assert_array_equal(np.asarray(out), single)


def test_sharded_load_on_an_8_device_mesh_equals_unsharded(tiny):
  _, directory, _ = tiny
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = load_pretrained(directory, mesh=mesh)
  specs = {p: v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(sharded))}
  # V = 97 does not divide the tensor axis: the vocabulary stays whole, the embedding dim is split.
  assert specs[("embed",)] == jax.sharding.PartitionSpec(None, "fsdp")
  assert any("tensor" in str(s) for p, s in specs.items() if "mlp" in p)
  ids = jnp.asarray(_ids((4, 16), seed=8))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda m, x: m(x))(sharded, ids)
  # Sharded matmuls sum partial products in another order: float32 rounding, same metric.
  assert _max_rel(got, load_pretrained(directory)(ids)) <= TOL


def test_init_random_is_born_sharded_and_seeded():
  config = CONFIGS["llama_gqa_untied_bias"]()
  mesh = make_mesh(data=-1, fsdp=2, tensor=2)
  model = init_random(config, seed=3, mesh=mesh)
  state = nnx.state(model)
  expected = state_shardings(state, mesh)
  for (path, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
    assert v.get_value().sharding.is_equivalent_to(s, v.get_value().ndim), path
  again = init_random(config, seed=3)
  np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(again.embed[...]))


def test_load_errors_name_the_problem(tmp_path):
  make_checkpoint("llama_mqa_tied", tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(UserError, match="not a model directory"):
    load_pretrained(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
  with pytest.raises(UserError, match="unsupported model_type 'mamba'; supported families: "
                                      "gemma, gemma2, gemma3_text, gpt2, llama, mistral, qwen2, "
                                      "qwen3 "):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(UserError, match=r"missing \['model.layers.2"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
  with pytest.raises(UserError, match=r"unexpected \['model.layers.1"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
  with pytest.raises(UserError, match="mlp.gate_proj.weight: shape .* does not fit"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json: not valid JSON .*fix or replace"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "model.safetensors").write_bytes(b"\x01")
  with pytest.raises(UserError, match="model.safetensors: not a safetensors file"):
    load_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(UserError, match=r"no \*.safetensors files in"):
    load_pretrained(tmp_path)


def test_save_pretrained_shards_above_the_limit(tmp_path):
  directory = tmp_path / "src"
  make_checkpoint("llama_gqa_untied_bias", directory)
  model = load_pretrained(directory)
  save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 1 and all((tmp_path / "sharded" / f).exists() for f in files)
  assert not list((tmp_path / "sharded").glob("*.partial"))
  ids = _ids((1, 9), seed=9)
  np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "sharded")(ids)),
                                np.asarray(model(ids)))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
  with torch.no_grad():
    ref = reloaded.float()(torch.tensor(ids)).logits.numpy()
  assert _max_rel(model(ids), ref) <= TOL
