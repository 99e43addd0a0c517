"""The errors a user can fix.

`UserError` marks a problem with the input (a config key, a path, a mesh, a data file), whose
message is one line naming the problem and the fix. The command line prints it in one line;
every other exception is a bug and keeps its traceback. `storage_failure` tells a write that
failed for want of space or permission (a full disk, a read-only file system) from a bug.
"""

from __future__ import annotations

import errno
import re


class UserError(ValueError):
  """Bad input a user can fix; the message is one line that names the problem and the fix."""


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
