"""The errors a user can fix.

`UserError` marks a problem with the input (a config key, a path, a mesh, a data file), whose
message is one line naming the problem and the fix. The command line prints it in one line;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad input a user can fix; the message is one line that names the problem and the fix."""
