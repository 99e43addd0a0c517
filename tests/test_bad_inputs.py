"""Bad input through the command line: exit status 2, ONE stderr line that names the key or file
(and the fix), no traceback, and nothing written: no workdir, no export, files untouched.

The commands run in-process (`csd_jax.cli.main`): config errors are raised before JAX computes
anything, so the whole table takes seconds.
"""

import json
import os
import pathlib

import pytest

from csd_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

# (override, what the one error line must name)
CONFIG_CASES = [
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("train.log_every=0", "train.log_every=0: must be >= 1"),
    ("train.steps=-5", "train.steps=-5: must be >= 0"),
    ("train.epochs=-1", "train.epochs=-1.0: must be >= 0"),
    ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0: must be >= 1"),
    ("train.heldout_batches=0", "train.heldout_batches=0: must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("train.seed=-1", "train.seed=-1: must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.clip_norm=-1", "optim.clip_norm=-1.0: must be >= 0"),
    ("optim.b1=1", "optim.b1=1.0: must be in [0, 1)"),
    ("optim.b2=-0.5", "optim.b2=-0.5: must be in [0, 1)"),
    ("lora.rank=-1", "lora.rank=-1: must be >= 0"),
    ("lora.dropout=1.5", "lora.dropout=1.5: must be in [0, 1)"),
    ("checkpoint.keep=0", "checkpoint.keep=0: must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every=-1: must be >= 0"),
    ("loss.chunk_size=0", "loss.chunk_size=0: must be >= 1"),
    ("mesh.tensor=0", "mesh.tensor=0: must be >= 1, or -1"),
    ("student.config.n_head=3", "student.config: n_head=3 does not divide n_embd=32"),
    ("teacher.config.n_head=0", "teacher.config: n_head=0: must be a positive integer"),
    ("student.config={model_type: llama, hidden_size: 32, num_hidden_layers: 1, "
     "num_attention_heads: 4, num_key_value_heads: 3, intermediate_size: 64, vocab_size: 256}",
     "student.config: num_key_value_heads=3 does not divide num_attention_heads=4"),
]


def _tree(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every path under `root` with its size and modification time: what "unchanged" compares."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*"))}


def _one_error_line(capsys, command: str, *names: str) -> str:
  """The command's stderr: one line, `csd-jax COMMAND: ...`, which names each of `names`."""
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"csd-jax {command}: "), lines
  assert all(name in lines[0] for name in names), lines[0]
  return lines[0]


@pytest.mark.parametrize("override,message", CONFIG_CASES, ids=[c[0][:40] for c in CONFIG_CASES])
def test_a_bad_config_value_is_one_line_and_writes_nothing(override, message, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), override]) == 2
  _one_error_line(capsys, "train", message)
  assert not workdir.exists()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> pathlib.Path:
  """A GPT-2 directory: config.json and a model.safetensors of two tensors (the errors here come
  before any weight is matched to the config)."""
  import numpy as np

  from csd_jax.models.io.safetensors import write_file

  directory = tmp_path_factory.mktemp("tiny_gpt2")
  config = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 64,
            "n_positions": 32}
  (directory / "config.json").write_text(json.dumps(config))
  write_file(directory / "model.safetensors",
             {"transformer.wte.weight": np.ones((64, 16), np.float32),
              "transformer.wpe.weight": np.ones((32, 16), np.float32)})
  return directory


def test_export_to_an_existing_file(tmp_path, capsys):
  target = tmp_path / "somefile"
  target.write_text("keep me")
  before = _tree(tmp_path)
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(target)]) == 2
  _one_error_line(capsys, "export", f"--out {target}", "is a file")
  assert _tree(tmp_path) == before and target.read_text() == "keep me"


def test_export_into_a_directory_of_other_files(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  before = _tree(tmp_path)
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path)]) == 2
  _one_error_line(capsys, "export", f"--out {tmp_path}", "new or empty directory")
  assert _tree(tmp_path) == before


def test_convert_gguf_to_an_existing_file(tmp_path, capsys):
  target = tmp_path / "out"
  target.write_text("keep me")
  assert cli.main(["convert-gguf", str(tmp_path / "x.gguf"), str(target)]) == 2
  _one_error_line(capsys, "convert-gguf", f"out_dir {target}", "is a file")
  assert target.read_text() == "keep me"


def test_eval_seeds_that_are_not_integers(tmp_path, capsys):
  assert cli.main(["eval", "--model", str(tmp_path), "--data", f"d={tmp_path / 'd.jsonl'}",
                   "--seeds", "10,abc"]) == 2
  _one_error_line(capsys, "eval", "--seeds '10,abc'", "integers")
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cut", [4, 200, -100], ids=["length", "header", "data"])
def test_a_truncated_safetensors_file_is_named(cut, tiny_gpt2, tmp_path, capsys):
  model = tmp_path / "model"
  model.mkdir()
  for name in ("config.json", "model.safetensors"):
    (model / name).write_bytes((tiny_gpt2 / name).read_bytes())
  weights = model / "model.safetensors"
  size = weights.stat().st_size
  os.truncate(weights, cut if cut > 0 else size + cut)
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"instruction": "Hi.", "response": "Hello."}) + "\n")
  before = _tree(tmp_path)
  assert cli.main(["eval", "--model", str(model), "--data", f"d={data}"]) == 2
  line = _one_error_line(capsys, "eval", str(weights))
  assert "corrupt or cut short" in line and "again" in line
  assert _tree(tmp_path) == before


def test_a_non_utf8_data_file_is_named_with_its_line(tmp_path, capsys):
  data = tmp_path / "latin1.jsonl"
  data.write_bytes(b'{"instruction": "Name a colour.", "response": "Blue."}\n'
                   b'{"instruction": "Caf\xe9?", "response": "Yes."}\n')
  before = _tree(tmp_path)
  assert cli.main(["eval", "--model", str(tmp_path / "model"), "--data", f"d={data}"]) == 2
  _one_error_line(capsys, "eval", f"{data}:2: not UTF-8", "convert the file to UTF-8")
  assert _tree(tmp_path) == before
  # Training reads its files through the TFDS builder: the same line, through it.
  from csd_jax.data import tfds_builder
  from csd_jax.errors import UserError

  with pytest.raises(UserError, match=f"^{data}:2: not UTF-8"):
    tfds_builder.instruction_files({"train": [data]}, tmp_path / "tfds")


@pytest.mark.parametrize("suffix,content,where", [
    (".json", b'[{"instruction": "a",\n "response": "\xff"}]', ":2: not UTF-8"),
    (".parquet", b"PAR1 not parquet", ": not a readable Parquet file"),
])
def test_other_unreadable_data_files(suffix, content, where, tmp_path):
  from csd_jax.data.records import read_json_records
  from csd_jax.errors import UserError

  path = tmp_path / f"data{suffix}"
  path.write_bytes(content)
  with pytest.raises(UserError) as error:
    list(read_json_records(path))
  assert str(error.value).startswith(f"{path}{where}") and "\n" not in str(error.value)


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
  from csd_jax.data.records import read_json_records

  path = tmp_path / "bom.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "response": "b"}\r\n')
  assert list(read_json_records(path)) == [("bom.jsonl:1", {"instruction": "a", "response": "b"})]


def test_an_incomplete_model_config_names_the_missing_key():
  """Refused where the model is built (the config checks let it pass: a config may be loaded
  only for its settings)."""
  from csd_jax.models.families import IncompleteConfig, config_from_hf

  with pytest.raises(IncompleteConfig, match=r"^gpt2 config: no 'n_embd'; add it"):
    config_from_hf({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "vocab_size": 256})


def test_a_model_directory_with_bad_heads_is_refused_before_the_run(tiny_gpt2, tmp_path, capsys):
  """A student.path's config.json is read by the config checks: refused before the workdir."""
  model = tmp_path / "model"
  model.mkdir()
  hf = json.loads((tiny_gpt2 / "config.json").read_text())
  (model / "config.json").write_text(json.dumps({**hf, "n_head": 3}))
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), f"student.path={model}",
                   "student.config=null"]) == 2
  _one_error_line(capsys, "train", f"student.path: {model / 'config.json'}",
                  "n_head=3 does not divide n_embd=16")
  assert not workdir.exists()
