"""A run's writes that fail for want of space or permission, told in one line that says what
is safe.

A full disk, a read-only file system or a revoked permission reaches the loop in many shapes:
an `OSError` from a metrics or config write, a `ValueError("RESOURCE_EXHAUSTED: ... No space
left on device [os_error_code='28']")` from TensorStore under an Orbax save, wrapped in the
exceptions of Orbax's background threads. `storage_failure` recognises them; `storage_error`
is the one line the user gets: what failed and which checkpoint is intact (Orbax commits a step
by renaming its directory once complete, so every complete one is whole).
"""

from __future__ import annotations

import errno
import os
import pathlib
import re

from csd_jax.errors import UserError

_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}
# TensorStore's messages carry the errno as os_error_code='N'.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_failure(error: BaseException) -> str | None:
  """Why `error` (or an exception it was raised from) is a failed write of this kind, or None
  when it is something else (a bug keeps its traceback)."""
  seen: set[int] = set()
  current: BaseException | None = error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in _ERRNOS:
      where = f" ({current.filename})" if current.filename else ""
      return _ERRNOS[current.errno] + where
    match = _OS_ERROR_CODE.search(str(current))
    if match and int(match.group(1)) in _ERRNOS:
      return _ERRNOS[int(match.group(1))]
    current = current.__cause__ or current.__context__
  return None


def complete_checkpoints(directory: pathlib.Path) -> list[int]:
  """The steps of the complete checkpoints in `directory` (Orbax names an unfinished one
  `<step>.orbax-checkpoint-tmp...`)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def storage_error(reason: str, workdir: pathlib.Path, checkpoints: pathlib.Path) -> UserError:
  """The one line of a failed write: what failed, the last intact checkpoint, the fix."""
  steps = complete_checkpoints(checkpoints)
  safe = (f"the checkpoint of step {steps[-1]} in {checkpoints} is intact"
          if steps else "no checkpoint was written")
  return UserError(f"cannot write under {os.fspath(workdir)}: {reason}; {safe}; free space or "
                   "fix the permissions, then re-run the same command to continue")
