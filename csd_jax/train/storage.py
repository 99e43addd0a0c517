"""A run's writes that fail for want of space or permission, told in one line that says what
is safe.

A full disk, a read-only file system or a revoked permission reaches the loop in many shapes:
an `OSError` from a metrics or config write, a `ValueError("RESOURCE_EXHAUSTED: ... No space
left on device [os_error_code='28']")` from TensorStore under an Orbax save, wrapped in the
exceptions of Orbax's background threads. `csd_jax.errors.storage_failure` recognises them
(also for the logs, which keep them to one line); `storage_error`
is the one line the user gets: what failed and which checkpoint is intact (Orbax commits a step
by renaming its directory once complete, so every complete one is whole).
"""

from __future__ import annotations

import os

from csd_jax.runtime import paths
from csd_jax.errors import UserError


def complete_checkpoints(directory: paths.PathLike) -> list[int]:
  """The steps of the complete checkpoints in `directory` (Orbax names an unfinished one
  `<step>.orbax-checkpoint-tmp...` on a disk; in an object store a step is complete once its
  `commit_success.txt` is written)."""
  directory = paths.as_path(directory)
  if not directory.is_dir():
    return []
  steps = [p for p in directory.iterdir() if p.name.isdigit()]
  if paths.is_remote(directory):
    from orbax.checkpoint import step as orbax_step

    steps = [p for p in steps if orbax_step.is_path_finalized(p)]
  return sorted(int(p.name) for p in steps)


def storage_error(reason: str, workdir: paths.PathLike, checkpoints: paths.PathLike
                  ) -> UserError:
  """The one line of a failed write: what failed, the last intact checkpoint, the fix."""
  steps = complete_checkpoints(checkpoints)
  safe = (f"the checkpoint of step {steps[-1]} in {checkpoints} is intact"
          if steps else "no checkpoint was written")
  return UserError(f"cannot write under {os.fspath(workdir)}: {reason}; {safe}; free space or "
                   "fix the permissions, then re-run the same command to continue")
