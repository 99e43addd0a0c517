"""The house rules: the import graph's directions, the loop's periods, the CLI's two kinds of
errors, and run directories that open from anywhere."""

import ast
import pathlib
import sys

import pytest

from csd_jax import cli
from csd_jax.config import load_config
from csd_jax.config.paths import resolve_paths
from csd_jax.train.actions import itstime

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "csd_jax"


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, *, top_level_only: bool) -> set[str]:
  """The csd_jax modules `path` imports (at import time only, or anywhere in the file)."""
  modules = {_module(p) for p in PACKAGE.rglob("*.py")}
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("csd_jax"):
      submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
      # `from package import submodule` depends on the submodule, not on the package's
      # __init__ (which may itself import its submodules: no cycle in that).
      found.update(submodules if len(submodules) == len(node.names) else {node.module})
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("csd_jax"))
  return {m for m in found if m in modules}


GRAPH = {_module(p): _imports(p, top_level_only=False) for p in PACKAGE.rglob("*.py")}
IMPORT_TIME = {_module(p): _imports(p, top_level_only=True) for p in PACKAGE.rglob("*.py")}


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_eval_never_reaches_train():
  for module in GRAPH:
    if module.startswith("csd_jax.eval"):
      reached = {m for m in _reachable(module, GRAPH) if m.startswith("csd_jax.train")}
      assert not reached, (module, reached)


def test_config_imports_neither_models_nor_losses_at_import_time():
  reached = _reachable("csd_jax.config", IMPORT_TIME)
  assert not {m for m in reached if m.startswith(("csd_jax.models", "csd_jax.losses"))}


def test_losses_import_nothing_else_of_the_project():
  for module, imports in GRAPH.items():
    if module.startswith("csd_jax.losses"):
      assert all(m.startswith("csd_jax.losses") for m in imports), (module, imports)


def test_models_and_data_keep_their_directions():
  for module, imports in GRAPH.items():
    if module.startswith("csd_jax.models"):
      assert not {m for m in imports if m.startswith(("csd_jax.losses", "csd_jax.data",
                                                      "csd_jax.train", "csd_jax.run."))}
    if module.startswith("csd_jax.data"):
      assert not {m for m in imports if m.startswith(("csd_jax.models", "csd_jax.train"))}


def test_runtime_knows_nothing_of_distillation():
  for module, imports in GRAPH.items():
    if module.startswith("csd_jax.runtime"):
      assert all(m.startswith("csd_jax.runtime") or m == "csd_jax.errors" for m in imports), \
          (module, imports)


def test_no_import_cycles():
  """Counting the imports inside functions too: a deferred import dodges a cycle at import time
  but leaves the two modules knotted together."""
  for module in GRAPH:
    assert module not in _reachable(module, GRAPH), module


def test_no_private_name_is_imported_from_another_module():
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csd_jax"):
        private = [a.name for a in node.names if a.name.startswith("_")]
        assert not private, f"{_module(path)} imports {private} from {node.module}"


def test_one_ignored_label():
  """The data's label for "no target" is the one the losses skip (the loss library imports
  nothing of the project, so each names it)."""
  from csd_jax.data.fields import IGNORE_INDEX
  from csd_jax.losses import IGNORE_LABEL

  assert IGNORE_INDEX == IGNORE_LABEL == -100


def test_no_string_keyed_train_state():
  for path in PACKAGE.rglob("*.py"):
    text = path.read_text()
    assert '["params"]' not in text and '["frozen"]' not in text, path


def test_itstime():
  assert [s for s in range(1, 11) if itstime(s, 3, 10)] == [3, 6, 9, 10]
  assert [s for s in range(1, 11) if itstime(s, 3, 10, last=False)] == [3, 6, 9]
  assert [s for s in range(1, 11) if itstime(s, 0, 10)] == [10]
  assert not any(itstime(s, 0, 10, last=False) for s in range(1, 11))


def test_a_config_error_is_one_line(capsys, tmp_path):
  code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir",
                   str(tmp_path), "train.eval_every=5"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert "train.eval_every' was renamed train.heldout_every" in err[0]


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path):
  import csd_jax.train.loop

  def broken(config, workdir):
    raise ValueError("a bug deep inside")  # a plain ValueError is not a user error

  monkeypatch.setattr(csd_jax.train.loop, "train", broken)
  with pytest.raises(ValueError, match="a bug deep inside"):
    cli.main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir",
              str(tmp_path)])


def test_resolved_paths_open_from_anywhere(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "train.jsonl").write_text("{}")
  (tmp_path / "model").mkdir()
  monkeypatch.chdir(tmp_path)
  config = resolve_paths(load_config(None, [
      "teacher.path=model", "student.path=Qwen/Qwen2.5-0.5B", "data.train_files=[data/train.jsonl]",
      "data.data_dir=tfds", "data.tokenizer=gs://bucket/tok", "eval.datasets.dolly=d.jsonl"]),
      tmp_path)
  assert config.teacher.path == str(tmp_path / "model")          # exists: local
  assert config.student.path == "Qwen/Qwen2.5-0.5B"               # does not: a hub id
  assert config.data.train_files == [str(tmp_path / "data" / "train.jsonl")]
  assert config.data.data_dir == str(tmp_path / "tfds")            # local, made later
  assert config.data.tokenizer == "gs://bucket/tok"
  assert config.eval.datasets == {"dolly": str(tmp_path / "d.jsonl")}
  assert resolve_paths(config, "/elsewhere") == config             # idempotent


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))
