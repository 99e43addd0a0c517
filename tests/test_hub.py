"""Hub ids as model paths, offline: a cache laid out as huggingface_hub lays it out
(`models--owner--name/{blobs,snapshots,refs}`, checked with huggingface_hub's own scanner),
HF_HUB_OFFLINE=1, and the project's loaders reading from it."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml
from flax import nnx

from csd_jax.config import load_config
from csd_jax.config.paths import resolve_paths
from csd_jax.errors import UserError
from csd_jax.models import load_pretrained
from csd_jax.models.io import hub

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-gpt2"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40   # main, and tag v1.0
VOCAB = 320                               # > the byte-level tokenizer's 259 tokens


def _model_dir(directory: pathlib.Path, seed: int) -> pathlib.Path:
  """A tiny GPT-2 written by transformers' save_pretrained (safetensors) and a tokenizer."""
  import torch
  import transformers
  from chat_tokenizers import chat_tokenizer

  torch.manual_seed(seed)
  config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB,
                                   n_positions=64, bos_token_id=0, eos_token_id=258)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  chat_tokenizer("qwen2.5").save_pretrained(directory)
  return directory


def add_snapshot(cache: pathlib.Path, repo_id: str, source: pathlib.Path, commit: str,
                 refs: tuple[str, ...] = ("main",), skip: tuple[str, ...] = ()) -> pathlib.Path:
  """`source`'s files as snapshot `commit` of `repo_id`: blobs named by their sha256,
  snapshot entries as relative symlinks to them, each of `refs` holding the commit."""
  storage = cache / ("models--" + repo_id.replace("/", "--"))
  snapshot = storage / "snapshots" / commit
  for file in sorted(p for p in source.rglob("*") if p.is_file()):
    name = file.relative_to(source)
    if str(name) in skip:
      continue
    data = file.read_bytes()
    blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = snapshot / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  for ref in refs:
    (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)   # no newline, as huggingface_hub writes it
  return snapshot


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Two tiny models (different weights, same tokenizer): what commits A and B hold."""
  root = tmp_path_factory.mktemp("hub_models")
  return {"a": _model_dir(root / "a", seed=0), "b": _model_dir(root / "b", seed=1)}


@pytest.fixture
def cache(tmp_path, models, monkeypatch) -> pathlib.Path:
  """A filled hub cache, HF_HUB_OFFLINE=1 (the environment for subprocesses, huggingface_hub's
  constants in this process: it reads both at import)."""
  from huggingface_hub import constants

  cache = tmp_path / "hf_cache"
  add_snapshot(cache, REPO, models["a"], COMMIT_A)
  add_snapshot(cache, REPO, models["b"], COMMIT_B, refs=("v1.0",))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  hub.clear_cache()
  yield cache
  hub.clear_cache()


def _params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(cache):
  from huggingface_hub import scan_cache_dir

  info = scan_cache_dir(cache)
  assert not info.warnings, info.warnings
  (repo,) = info.repos
  assert repo.repo_id == REPO and repo.repo_type == "model"
  refs = {r.commit_hash: set(r.refs) for r in repo.revisions}
  assert refs == {COMMIT_A: {"main"}, COMMIT_B: {"v1.0"}}


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub.parse_hub_id("Qwen/Qwen2.5-1.5B-Instruct") == hub.HubId("Qwen/Qwen2.5-1.5B-Instruct")
  assert hub.parse_hub_id("Qwen/Q@refs/pr/1") == hub.HubId("Qwen/Q", "refs/pr/1")
  for local in ("gs://bucket/model", "/abs/owner/name", "./owner/name", "~/owner/name",
                "gpt2", "a/b/c", "owner/name@", ""):
    assert hub.parse_hub_id(local) is None, local
  (tmp_path / "owner" / "name").mkdir(parents=True)
  assert hub.parse_hub_id("owner/name") is None   # a directory of that name exists: local


def test_a_hub_id_resolves_to_its_snapshot(cache, caplog):
  caplog.set_level("INFO", logger="csd_jax.hub")
  snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
  assert pathlib.Path(hub.resolve(REPO)) == snapshot / COMMIT_A            # refs/main
  assert pathlib.Path(hub.resolve(f"{REPO}@v1.0")) == snapshot / COMMIT_B  # a tag
  assert pathlib.Path(hub.resolve(f"{REPO}@{COMMIT_A}")) == snapshot / COMMIT_A  # a commit
  assert pathlib.Path(hub.resolve(REPO)) == snapshot / COMMIT_A            # once, then memoised
  lines = [r.getMessage() for r in caplog.records if r.name == "csd_jax.hub"]
  assert len(lines) == 3, lines   # one line per id, naming the snapshot and the commit
  assert f"{REPO}@v1.0" in lines[1] and str(snapshot / COMMIT_B) in lines[1]
  assert f"commit {COMMIT_B}" in lines[1] and "revision v1.0" in lines[1]


def test_loading_a_hub_id_gives_the_local_directory_parameters(cache, models):
  from_hub, local = _params(load_pretrained(REPO)), _params(load_pretrained(models["a"]))
  assert from_hub.keys() == local.keys()
  for path in local:
    np.testing.assert_array_equal(from_hub[path], local[path], err_msg=str(path))
  tagged = _params(load_pretrained(f"{REPO}@v1.0"))
  other = _params(load_pretrained(models["b"]))
  assert all(np.array_equal(tagged[p], other[p]) for p in other)
  assert not all(np.array_equal(tagged[p], local[p]) for p in local)   # B is not A


def test_only_the_files_the_port_reads_are_asked_for(cache, tmp_path, monkeypatch):
  """Config, tokenizer and the shards the index names (not a stray consolidated copy), the
  second request pinned to the commit the first resolved."""
  import huggingface_hub
  import torch
  import transformers

  source = tmp_path / "sharded"
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64))
  model.save_pretrained(source, max_shard_size="40KB")
  index = json.loads((source / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1
  (source / "consolidated.safetensors").write_bytes((source / shards[0]).read_bytes())
  add_snapshot(cache, "tiny-org/sharded", source, COMMIT_A)
  calls, real = [], huggingface_hub.snapshot_download

  def recording(repo_id, **kwargs):
    calls.append((kwargs["revision"], kwargs["allow_patterns"]))
    return real(repo_id, **kwargs)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
  load_pretrained("tiny-org/sharded")
  (first, first_patterns), (second, second_patterns) = calls
  assert first is None and second == COMMIT_A
  assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "*.safetensors.index.json"} <= set(first_patterns)
  assert not any(p.endswith(".safetensors") for p in first_patterns)
  weights = [p for p in second_patterns if "safetensors" in p]
  assert weights == ["model.safetensors.index.json", *shards]   # no consolidated.safetensors


def test_the_tokenizer_of_a_hub_id_through_the_run(cache):
  from csd_jax.run.models import resolve_tokenizer

  config = load_config(ROOT / "configs" / "tiny.yaml",
                       [f"data.tokenizer={REPO}@v1.0"])
  tokenizer = resolve_tokenizer(config)
  assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 258
  assert tokenizer.decode(tokenizer("hub ids")["input_ids"]) == "hub ids"


def test_a_local_directory_named_like_the_hub_id_wins(cache, models, tmp_path, monkeypatch):
  local = tmp_path / "work" / REPO
  _model_dir(local, seed=1)    # commit B's weights, under the id of commit A
  monkeypatch.chdir(tmp_path / "work")
  assert str(hub.resolve(REPO)) == REPO
  loaded, b = _params(load_pretrained(REPO)), _params(load_pretrained(models["b"]))
  assert all(np.array_equal(loaded[p], b[p]) for p in b)
  # resolve_paths: made absolute where the config's directory holds it, else kept as a hub id.
  config = load_config(ROOT / "configs" / "tiny.yaml", [f"student.path={REPO}",
                                                         "student.config=null"])
  assert resolve_paths(config, tmp_path / "work").student.path == str(local)
  assert resolve_paths(config, tmp_path).student.path == REPO
  assert resolve_paths(config, tmp_path).student.path == REPO


def test_a_cached_hub_config_is_checked_with_the_config(cache, tmp_path):
  from csd_jax.config import ConfigError

  source = tmp_path / "mamba"
  source.mkdir()
  (source / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
  add_snapshot(cache, "tiny-org/mamba", source, COMMIT_A, refs=("main", "v1.0"))
  with pytest.raises(ConfigError, match=r"student.path: .*snapshots/a+/config.json.*mamba"):
    load_config(ROOT / "configs" / "tiny.yaml", ["student.path=tiny-org/mamba@v1.0",
                                                 "student.config=null"])
  load_config(ROOT / "configs" / "tiny.yaml", ["student.path=tiny-org/not-cached",
                                               "student.config=null"])   # checked on loading


def _one_line_error(path: str, match: str) -> str:
  with pytest.raises(UserError, match=match) as error:
    load_pretrained(path)
  assert "\n" not in str(error.value)
  return str(error.value)


def test_a_repo_with_only_bin_weights_is_refused_in_one_line(cache, tmp_path, models):
  source = tmp_path / "bin_repo"
  source.mkdir()
  (source / "config.json").write_text((models["a"] / "config.json").read_text())
  (source / "pytorch_model.bin").write_bytes(b"not a pickle, never read")
  (source / "training_args.bin").write_bytes(b"")
  add_snapshot(cache, "tiny-org/bin-only", source, COMMIT_A)
  message = _one_line_error("tiny-org/bin-only", "has only PyTorch weights")
  assert "(pytorch_model.bin)" in message and "safe_serialization=True" in message
  assert "safetensors only" in message and "training_args" not in message


def test_bin_weights_known_from_the_cached_tree_listing(cache, tmp_path, models):
  """Online, only the allowed files are downloaded: the .bin files are known from the tree
  listing huggingface_hub caches (written here by its own code)."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  if not hasattr(huggingface_hub, "get_cached_repo_tree"):
    pytest.skip("huggingface_hub without a tree cache")
  from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

  source = tmp_path / "tree_repo"
  source.mkdir()
  (source / "config.json").write_text((models["a"] / "config.json").read_text())
  storage = add_snapshot(cache, "tiny-org/bin-tree", source, COMMIT_A).parents[1]
  write_tree_cache(str(storage), COMMIT_A, {
      "config.json": TreeCacheEntry(size=10, blob_id="1" * 40),
      "pytorch_model-00001-of-00002.bin": TreeCacheEntry(size=10, blob_id="2" * 40),
      "pytorch_model-00002-of-00002.bin": TreeCacheEntry(size=10, blob_id="3" * 40)})
  message = _one_line_error("tiny-org/bin-tree", "has only PyTorch weights")
  assert "pytorch_model-00001-of-00002.bin" in message


def test_a_repo_missing_offline_is_named_in_one_line(cache):
  message = _one_line_error("nobody/nothing", "hub repo nobody/nothing")
  assert "revision main" in message and "HF_HUB_OFFLINE=1" in message and str(cache) in message
  message = _one_line_error(f"{REPO}@v9", f"hub repo {REPO} .revision v9.")
  assert "HF_HUB_OFFLINE=1" in message
  with pytest.raises(UserError, match=r"not a model directory.*hub id \(owner/name"):
    load_pretrained("./owner/missing")   # a local path: never looked up on the hub


@pytest.mark.parametrize("error,message", [
    ("GatedRepoError", "is gated: accept its terms on huggingface.co and log in"),
    ("RepositoryNotFoundError", "not found on the Hugging Face hub (or private"),
    ("RevisionNotFoundError", "no such revision (branch, tag or commit) on the hub")])
def test_hub_errors_online_are_one_line(cache, monkeypatch, error, message):
  """What huggingface_hub raises online (a gated, missing or private repo, a missing
  revision), each told in one line naming the repo and the revision."""
  from unittest import mock

  import huggingface_hub
  from huggingface_hub import errors

  def refuse(*args, **kwargs):
    raise getattr(errors, error)("401 Client Error\nlong server text", response=mock.MagicMock())

  monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
  text = _one_line_error("gated-org/model@v2", "hub repo gated-org/model .revision v2.")
  assert message in text and "or pass a local model directory" in text


def test_a_train_run_from_a_hub_id_keeps_the_id(cache, tmp_path):
  """`csd-jax train` with `student.path: owner/name` (offline, from the cache); its config.yaml
  keeps the id, and reopening the run resolves it again."""
  from csd_jax.run.models import load_run_config, open_run

  workdir = tmp_path / "w"
  result = subprocess.run(
      [sys.executable, "-m", "csd_jax.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"),
       "--workdir", str(workdir), f"student.path={REPO}", "student.config=null",
       f"teacher.config.vocab_size={VOCAB}", "train.steps=2", "train.heldout_batches=1"],
      capture_output=True, text=True, check=False, cwd=tmp_path, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # One resolution for the tokenizer and the weights: one line.
  assert result.stderr.count(f"Hugging Face hub snapshot {cache}") == 1, result.stderr[-3000:]
  saved = yaml.safe_load((workdir / "config.yaml").read_text())
  assert saved["student"]["path"] == REPO
  run = open_run(workdir)
  assert run.step == 2 and run.config.student.path == REPO
  assert load_run_config(workdir).student.path == REPO
  assert json.loads((cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A
                     / "config.json").read_text())["vocab_size"] == run.student.cfg.vocab_size
