"""A config's paths made absolute, so that the resolved config of a run (W/config.yaml) opens
from any working directory; hub ids and URLs are kept as given."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

from csd_jax.config.schema import VALIDATION_SPLIT, Config


def resolve_paths(config: Config, base: str | os.PathLike) -> Config:
  """`config` with its relative local paths made absolute against `base`, so that the resolved
  config of a run (W/config.yaml) opens from any working directory.

  A relative model path or tokenizer (`teacher.path`, `student.path`, `data.tokenizer`) is made
  absolute only where it exists under `base`; otherwise it is kept as given, so that a hub id
  (`owner/name[@revision]`, resolved on loading by `csd_jax.models.io.hub`, where a directory
  of that name in the working directory still wins) stays a hub id in W/config.yaml and a
  resume resolves it again. Data files and `data.data_dir` are always made absolute (they are
  local); URLs (`gs://...`) and absolute paths are left as they are.
  """
  if "://" in os.fspath(base):   # W/config.yaml in an object store: written resolved already
    return config
  base = pathlib.Path(base).absolute()

  def local(path: str | None, *, must_exist: bool) -> str | None:
    if not path or "://" in path or path.startswith("~") or pathlib.Path(path).is_absolute():
      return path
    candidate = base / path
    return str(candidate) if candidate.exists() or not must_exist else path

  def files(paths: Sequence[str]) -> list[str]:
    return [local(p, must_exist=False) for p in paths]

  data = config.data
  teacher = config.teacher
  return dataclasses.replace(
      config,
      teacher=(None if teacher is None else
               dataclasses.replace(teacher, path=local(teacher.path, must_exist=True))),
      student=dataclasses.replace(config.student,
                                  path=local(config.student.path, must_exist=True)),
      data=dataclasses.replace(data, tokenizer=local(data.tokenizer, must_exist=True),
                               minillm_dolly=local(data.minillm_dolly, must_exist=False),
                               train_files=files(data.train_files),
                               eval_files=files(data.eval_files), lm_files=files(data.lm_files),
                               data_dir=local(data.data_dir, must_exist=False)),
      eval=dataclasses.replace(config.eval, datasets={
          name: path if path == VALIDATION_SPLIT else local(path, must_exist=False)
          for name, path in config.eval.datasets.items()}))
