"""What checkpoint checksums cost: hashing a saved checkpoint's files against restoring it.

    PYTHONPATH=. python bench/checkpoint_checksums.py [--gb 1.0] [--arrays 16] [--repeats 3]

Saves ~`--gb` GB of float32 arrays the way `csd_jax.run.checkpoint.Checkpointer` does (an Orbax
CheckpointManager, a Composite with a StandardSave item, OCDBT), then times, best of
`--repeats`: Orbax's restore of it into arrays, and `integrity.write_checksums`
(read + hash every file) with each hash. Both from the page cache ("warm": the files were just
written or read, as when a process hashes the shards it just saved) and, unless --no-cold, after
evicting the files from it with posix_fadvise(DONTNEED) ("cold": a resume after a reboot).
Prints MB/s and the ratio of hashing time to restore time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from csd_jax.run import integrity


def _evict(directory: pathlib.Path) -> None:
  """Drop the files' pages from the page cache (no root needed)."""
  for rel in integrity.step_files(directory):
    fd = os.open(directory / rel, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _best(fn, repeats: int, before=None) -> float:
  times = []
  for _ in range(repeats):
    if before is not None:
      before()
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=1.0)
  parser.add_argument("--arrays", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to save (default: a temporary dir)")
  parser.add_argument("--no-cold", action="store_true")
  args = parser.parse_args()

  per_array = int(args.gb * 1e9 / 4 / args.arrays)
  rng = np.random.default_rng(0)
  tree = {f"w{i}": jax.device_put(rng.standard_normal(per_array, dtype=np.float32))
          for i in range(args.arrays)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          tree)
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    manager = ocp.CheckpointManager(pathlib.Path(tmp) / "checkpoints")
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    step_dir = pathlib.Path(tmp) / "checkpoints" / "0"
    total = sum((step_dir / rel).stat().st_size for rel in integrity.step_files(step_dir))

    def restore() -> None:
      restored = manager.restore(0, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
      jax.block_until_ready(restored["state"])

    print(f"checkpoint: {total / 1e6:,.0f} MB in {len(integrity.step_files(step_dir))} files, "
          f"{args.arrays} float32 arrays; {jax.device_count()} {jax.default_backend()} device(s), "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    modes = [("warm", None)] + ([] if args.no_cold else [("cold", lambda: _evict(step_dir))])
    print(f"{'cache':6} {'what':16} {'seconds':>8} {'MB/s':>8} {'x restore':>10}")
    for mode, before in modes:
      restore()  # warm-up: compile, thread pools
      restore_s = _best(restore, args.repeats, before)
      print(f"{mode:6} {'orbax restore':16} {restore_s:8.3f} {total / 1e6 / restore_s:8,.0f} "
            f"{1.0:10.2f}")
      for algorithm in integrity.ALGORITHMS:
        seconds = _best(lambda a=algorithm: integrity.write_checksums(step_dir, 0, 1, a),
                        args.repeats, before)
        print(f"{mode:6} {algorithm:16} {seconds:8.3f} {total / 1e6 / seconds:8,.0f} "
              f"{seconds / restore_s:10.2f}")
    manager.close()


if __name__ == "__main__":
  main()
