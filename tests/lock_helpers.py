"""What the workdir lock tests on a disk (test_workdir.py) and in a bucket (test_workdir_gcs.py)
share."""

import subprocess
import sys
import threading

from csd_jax.errors import UserError
from csd_jax.run.lock import WorkdirLock


def dead_pid() -> int:
  """The pid of a process that has exited (no process has it now)."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def race_to_acquire(workdir, contenders: int) -> list[str]:
  """`contenders` threads acquire the workdir's lock at once: "won" or "refused" each (the
  winner holds it until every one has tried)."""
  barrier, results = threading.Barrier(contenders), []

  def contend():
    lock = WorkdirLock(workdir, process_index=0)
    barrier.wait()
    try:
      lock.acquire()
      results.append("won")
    except UserError:
      results.append("refused")
    barrier.wait()
    lock.release()

  threads = [threading.Thread(target=contend) for _ in range(contenders)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return results
