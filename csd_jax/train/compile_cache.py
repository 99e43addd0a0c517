"""XLA's persistent compilation cache for a run, and how long the run spent compiling.

Every start of a run compiles the same programs again (the train and eval steps, the model's
initialisation): about 11 s on the tiny config, minutes at real sizes, paid again by every
resume after a preemption. JAX's persistent cache keeps each compiled executable on disk, keyed
by the program, its shardings, the devices and the compiler's version, so a re-run of the same
command loads what an earlier start compiled. `train.compile_cache` says where: `workdir`
(default: W/xla_cache, which a resume finds), any directory (shared by runs of one shape), or
"" (off).

    with compile_cache.enabled(config.train.compile_cache, workdir) as compiled:
      ...                                      # build, compile, train
    logger.info("%s", compiled.summary())      # "compiled 41 programs in 9.8 s, 35 from ..."
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from etils import epath
from jax import monitoring

from csd_jax.runtime import paths

CACHE_DIR = "xla_cache"
# JAX's event names (jax/_src/dispatch.py, jax/_src/compiler.py): the time of each program's
# compilation (including a load from the persistent cache) and each load from the cache.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileTime:
  """The programs compiled (or loaded from the persistent cache) while it listens, and the
  seconds that took."""

  def __init__(self, directory: epath.Path | None):
    self.directory = directory
    self.programs, self.seconds, self.cache_hits = 0, 0.0, 0

  def _on_duration(self, event: str, seconds: float, **_: object) -> None:
    if event == _COMPILE_EVENT:
      self.programs += 1
      self.seconds += seconds

  def _on_event(self, event: str, **_: object) -> None:
    if event == _CACHE_HIT_EVENT:
      self.cache_hits += 1

  def summary(self) -> str:
    where = (f", {self.cache_hits} of them loaded from the persistent cache in {self.directory}"
             if self.directory is not None else " (train.compile_cache is off)")
    return f"XLA compiled {self.programs} programs in {self.seconds:.1f} s{where}"


def cache_directory(setting: str, workdir: paths.PathLike) -> epath.Path | None:
  """Where `train.compile_cache` puts the cache: None when it is off."""
  if not setting:
    return None
  return paths.as_path(workdir) / CACHE_DIR if setting == "workdir" else paths.as_path(setting)


def _use(directory: str | None, min_seconds: float) -> None:
  """Point JAX's cache at `directory` (None: off). JAX opens its cache once per process;
  `reset_cache` makes it re-read the setting, for a process that trains more than once (tests,
  a notebook) in different directories."""
  from jax._src import compilation_cache   # reset_cache has no public name

  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
  compilation_cache.reset_cache()


@contextlib.contextmanager
def enabled(setting: str, workdir: paths.PathLike) -> Iterator[CompileTime]:
  """JAX's persistent cache in `cache_directory(setting, workdir)` while the block runs (the
  process's own settings restored after it), and the compile time spent inside it."""
  directory = cache_directory(setting, workdir)
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  timer = CompileTime(directory)
  if directory is not None:
    # Every program, however quick to compile: a run's many small ones add up, and a resume
    # should compile nothing it compiled before.
    _use(str(directory), 0.0)
  monitoring.register_event_duration_secs_listener(timer._on_duration)
  monitoring.register_event_listener(timer._on_event)
  try:
    yield timer
  finally:
    monitoring.unregister_event_duration_listener(timer._on_duration)
    monitoring.unregister_event_listener(timer._on_event)
    if directory is not None:
      _use(*previous)
