"""What every command runs on, and nothing of distillation:

- `paths`: local and `gs://` paths as one type (etils.epath), and what object stores lack
  (atomic writes, exclusive creates, copies, local copies of remote model directories).
- `sharding`: the device mesh and THE table of logical axis -> mesh axes, and all derived from it.
- `distributed`: multi-host start-up from the environment, and gathering values from every process.
- `logs`: the commands' logging set-up.
"""
