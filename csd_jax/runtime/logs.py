"""The commands' logging: the run's own INFO lines, and no third-party banners.

`setup_logging()` is called once at the start of each command, before transformers is imported:
transformers reads its settings from the environment at import time. TFDS's "Downloading and
preparing dataset ..." lines are print()s, not log records: `csd_jax.data.tfds_builder` quiets
them where the datasets are built, so that they stay quiet however a builder is called.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from csd_jax.errors import storage_failure

# Set only where the user has not: their own setting wins (e.g. TRANSFORMERS_VERBOSITY=info to
# debug a tokenizer). Without torch, `import transformers` prints "PyTorch was not found. Models
# won't be available ..." (an advisory warning); this project never uses its PyTorch models, so
# its other warnings are about code paths we do not take either.
_ENV_DEFAULTS = {"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TRANSFORMERS_VERBOSITY": "error"}

# Their INFO lines drown the run's own; their warnings still show.
_WARNINGS_ONLY = ("absl", "jax", "orbax")


def _unretrieved_storage_failure(record: logging.LogRecord) -> bool:
  """asyncio's "Task exception was never retrieved" about a save that failed for want of space
  or permission: logged when the task is collected, after csd-jax's own line about it."""
  return (record.name == "asyncio" and "never retrieved" in str(record.msg)
          and bool(record.exc_info) and storage_failure(record.exc_info[1]) is not None)


class _OneLineErrors(logging.Filter):
  """Third-party errors in one line, without their traceback: Orbax (and asyncio, for its
  futures) log a failed background save (a full disk) with dozens of lines of stack before
  csd-jax reports the failure in one line that says which checkpoint is intact."""

  def filter(self, record: logging.LogRecord) -> bool:
    if _unretrieved_storage_failure(record):
      return False
    if record.exc_info and record.name.split(".")[0] in (*_WARNINGS_ONLY, "asyncio"):
      record.msg, record.args = record.getMessage().splitlines()[0], ()
      record.exc_info = record.exc_text = None
    return True


class _ClosedLoopFilter:
  """An `sys.unraisablehook` that sends asyncio's "Event loop is closed" errors to the debug
  log and everything else to the hook it wraps. TensorStore's I/O callbacks that land after an
  Orbax save or restore has failed (a full disk, a damaged step) find its event loop gone and
  report that as unraisable, one traceback each: noise after the failure csd-jax reports in one
  line, never meaningful to the user."""

  def __init__(self, wrapped: Any):
    self.wrapped = wrapped

  def __call__(self, args: Any) -> None:
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
      logging.getLogger("asyncio").debug("a late TensorStore callback: %s", args.exc_value)
      return
    self.wrapped(args)


def quiet_closed_loop_errors() -> None:
  """Install `_ClosedLoopFilter` (once)."""
  if not isinstance(sys.unraisablehook, _ClosedLoopFilter):
    sys.unraisablehook = _ClosedLoopFilter(sys.unraisablehook)


def setup_logging() -> None:
  """INFO lines as `LEVEL name: message` on stderr; third-party banners and chatter silenced."""
  for name, value in _ENV_DEFAULTS.items():
    os.environ.setdefault(name, value)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for name in _WARNINGS_ONLY:
    logging.getLogger(name).setLevel(logging.WARNING)
  quiet_closed_loop_errors()
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _OneLineErrors) for f in handler.filters):
      handler.addFilter(_OneLineErrors())
  if "transformers" in sys.modules:  # imported already: it read the environment before us
    level = logging.getLevelName(os.environ["TRANSFORMERS_VERBOSITY"].upper())
    logging.getLogger("transformers").setLevel(level if isinstance(level, int) else logging.ERROR)
