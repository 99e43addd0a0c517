"""One run per workdir, and the workdir's config history across resumes.

`WorkdirLock` makes a second `csd-jax train` on a busy workdir fail at once (a `UserError`
naming the holder) instead of both runs overwriting each other's checkpoints and metrics. The
lock is `W/.lock`, a JSON file created exclusively by process 0 (O_CREAT|O_EXCL on a disk, a
create with `ifGenerationMatch=0` on GCS); a lock left by a killed run is taken over with a
warning. A lock on this machine (same host name, pid namespace and boot id) is judged by whether
its pid still runs, one from another machine or container by its heartbeat's age.
`record_config` keeps W/config.yaml the current config and the one it replaces as
`config.step-<N>.yaml`, naming the keys that changed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Any

import yaml

from csd_jax.runtime import paths
from csd_jax.errors import UserError

logger = logging.getLogger("csd_jax.train")

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"   # the same name as csd_jax.run.models.CONFIG_FILE (not imported: JAX)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_UNREADABLE_GRACE_S = 10.0    # a lock is written microseconds after its creation
_ATTEMPTS = 20


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(_TIME_FORMAT)


def _age_s(stamp: Any) -> float:
  """Seconds since a `_TIME_FORMAT` stamp; infinite when it does not parse."""
  try:
    then = datetime.datetime.strptime(str(stamp), _TIME_FORMAT)
  except ValueError:
    return float("inf")
  return time.time() - then.replace(tzinfo=datetime.timezone.utc).timestamp()


def process_start_time(pid: int) -> int | None:
  """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, it names a process
  even after the pid is reused. None where there is no /proc, or no such process."""
  try:   # the name in (...) may hold spaces: fields are counted after its last ")"
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _changed_at(path: Any) -> float:
  """When the file last changed: its ctime on a disk, its upload's time in an object store."""
  return path.stat().mtime if paths.is_remote(path) else os.stat(path).st_ctime


def _pid_namespace() -> str | None:
  """Containers sharing the host's name (docker --network host) still have their own pids."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _boot_id() -> str | None:
  """This boot of this machine: two VMs made from one image share a host name and the root pid
  namespace (the same inode everywhere), never a boot id. None where there is no /proc."""
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
  except OSError:
    return None


def _token_of(raw: bytes) -> Any:
  """The `token` of a lock's content; None when it is no lock (unparseable, not an object)."""
  try:
    return json.loads(raw).get("token")
  except (ValueError, AttributeError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's process
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds W/.lock for the run (process 0 only; the other
  processes of a multi-host run do nothing) and removes it on exit, exception or not."""

  def __init__(self, workdir: str | os.PathLike, *, process_index: int | None = None,
               heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
    if process_index is None:
      import jax   # here, not at import time: the tests of this module need no JAX
      process_index = jax.process_index()
    self.workdir = paths.as_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.enabled = process_index == 0
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.token, self.held = uuid.uuid4().hex, False
    self._info_written: dict[str, Any] = {}
    self._stop, self._thread = threading.Event(), None

  def __enter__(self) -> WorkdirLock:
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.release()

  def _info(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()), "pid_ns": _pid_namespace(),
            "boot": _boot_id(), "command": shlex.join(sys.argv),
            "started": _now(), "heartbeat": _now(), "token": self.token}

  def acquire(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    info, holder = self._info(), {}
    for attempt in range(_ATTEMPTS):
      if paths.create_exclusive(self.path, json.dumps(info).encode()):
        self._hold(info)
        return
      try:
        raw, ctime = self.path.read_bytes(), _changed_at(self.path)
      except FileNotFoundError:
        continue   # released meanwhile
      if _token_of(raw) == self.token:
        # Our own create: gcsfs retried an upload whose answer was lost, and the retry's 412
        # made create_exclusive say False although the first try had created the lock.
        self._hold(info)
        return
      holder, reason = self._judge(raw, ctime)
      if reason is None and (holder or attempt == _ATTEMPTS - 1):
        break
      if reason is not None and self._remove_stale(raw):
        logger.warning("taking over %s, left by a run that is gone (%s): %s", self.path,
                       _describe(holder), reason)
      else:   # being written, or being taken over by another run: look again
        time.sleep(0.05)
    raise UserError(f"{self.workdir} is in use by another run ({_describe(holder)}); wait for "
                    f"it to finish or stop it, or use another --workdir; if you are sure it is "
                    f"dead, delete {self.path}")

  def _hold(self, info: dict[str, Any]) -> None:
    self._info_written, self.held = info, True
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _judge(self, raw: bytes, ctime: float) -> tuple[dict[str, Any], str | None]:
    """The lock's holder, and why it is stale (None: it is held)."""
    try:
      holder = json.loads(raw)
      pid = int(holder["pid"])
    except (ValueError, KeyError, TypeError):
      stale = time.time() - ctime > _UNREADABLE_GRACE_S
      return {}, "unreadable lock file" if stale else None
    boot, our_boot = holder.get("boot"), _boot_id()
    another_boot = None not in (boot, our_boot) and boot != our_boot   # no `boot`: older locks
    if another_boot or ((holder.get("host"), holder.get("pid_ns"))
                        != (socket.gethostname(), _pid_namespace())):
      # Another machine (shared file system, bucket) or container: its pids mean nothing here.
      age = _age_s(holder.get("heartbeat"))
      return holder, (f"no heartbeat for {age:.0f} s" if age > self.stale_after_s else None)
    if not _pid_alive(pid):
      return holder, f"pid {pid} is no longer running"
    start = process_start_time(pid)
    if None not in (start, holder.get("pid_start")) and start != holder["pid_start"]:
      return holder, f"pid {pid} is now another process"
    return holder, None

  def _remove_stale(self, raw: bytes) -> bool:
    """Removes the stale lock whose content is `raw`; False where another run won the race
    or the lock changed. Contenders hard-link the lock to one claim name derived from its
    content: only one link succeeds, and the winner checks it claimed that very file. GCS has no
    links: the lock's generation is read, then its content, then its generation again (the
    content read is that generation's), and only that generation is deleted (`ifGenerationMatch`):
    of two contenders that both judged it stale, one deletes it, and the other's delete fails
    instead of removing the lock the first has created since. Another object store, with no
    generations, deletes the lock while it still holds `raw` (not atomic: a contender that
    re-created it in the instant between that read and the delete loses its lock, and learns it
    at its first heartbeat)."""
    if paths.is_remote(self.path):
      try:
        generation = paths.generation(self.path)
        if self.path.read_bytes() != raw:
          return False
        if generation is None:
          self.path.unlink()
          return True
        if paths.generation(self.path) != generation:   # rewritten while we read it
          return False
        return paths.delete_if_generation(self.path, generation)
      except FileNotFoundError:
        return False
    claim = self.path.with_name(f"{LOCK_FILE}.takeover-{hashlib.sha1(raw).hexdigest()[:16]}")
    try:
      os.link(self.path, claim)
    except FileNotFoundError:
      return False
    except FileExistsError:   # another run's claim; one left by a crashed run expires
      try:
        if time.time() - _changed_at(claim) > _UNREADABLE_GRACE_S:
          claim.unlink()
      except FileNotFoundError:
        pass
      return False
    try:
      if claim.read_bytes() != raw:   # the lock changed after we judged it
        return False
      self.path.unlink()
      return True
    finally:
      claim.unlink(missing_ok=True)

  def _mine(self) -> bool:
    """Whether the lock file holds this lock's token (False: gone, or another run's).

    Raises:
      Whatever reading it raised but FileNotFoundError (OSError, gcsfs's HttpError...): unknown.
    """
    try:
      raw = self.path.read_bytes()
    except FileNotFoundError:
      return False
    return _token_of(raw) == self.token

  def _beat(self) -> None:
    """Refreshes the heartbeat (what runs on other hosts judge the lock by) until release."""
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self._mine():
          logger.warning("%s was taken over by another run; this run no longer holds it",
                         self.path)
          return
        paths.write_atomic(self.path, json.dumps({**self._info_written, "heartbeat": _now()}))
      except Exception as error:   # noqa: BLE001
        # Any error (a full disk, gcsfs's HttpError once its retries are spent: no OSError):
        # the run goes on and the next beat retries. A dead heartbeat thread would make this
        # live run's lock look stale, and another host would take it over.
        logger.warning("could not refresh the heartbeat of %s (retried in %g s): %s: %s",
                       self.path, self.heartbeat_s, type(error).__name__, error)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock, unless another run holds it now."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
    if self.held:
      self.held = False
      try:
        mine = self._mine()
      except Exception as error:   # noqa: BLE001 - releasing must not mask the run's own error
        logger.warning("could not read %s to remove it (left in place; the next run takes it "
                       "over once this one is gone): %s: %s", self.path, type(error).__name__,
                       error)
        return
      if mine:
        self.path.unlink(missing_ok=True)
      else:
        logger.warning("%s is no longer this run's: left in place", self.path)


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "holder unknown: unreadable lock file"
  command = str(holder.get("command")).replace("\n", " ")   # the message stays one line
  command = command if len(command) <= 80 else command[:77] + "..."
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
          f", command: {command}")


_ABSENT = object()
_MAX_VALUE_CHARS = 40


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "(absent)"
  text = value if isinstance(value, str) else json.dumps(value, default=str)
  text = text.replace("\n", "\\n")
  return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS - 3] + "..."


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
  """`key.path: old -> new` for every leaf that differs (lists compare as one value)."""
  if isinstance(old, dict) and isinstance(new, dict):
    keys = list(old) + [k for k in new if k not in old]
    return [line for k in keys for line in config_changes(
        old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix.rstrip('.') or 'config'}: {_show(old)} -> {_show(new)}"]


def record_config(workdir: str | os.PathLike, config: dict[str, Any], step: int) -> list[str]:
  """Writes `config` (plain YAML data) as W/config.yaml. When the one there differs, it is
  kept as W/config.step-<step>.yaml (`step`: where this start resumes) and the differences are
  logged in one warning line and returned, e.g. ['loss.name: csd -> fkl']."""
  path = paths.as_path(workdir) / CONFIG_FILE
  text = yaml.safe_dump(config, sort_keys=False)
  if not path.exists():
    paths.write_atomic(path, text)
    return []
  old_text = path.read_text()
  try:
    old = yaml.safe_load(old_text)
  except yaml.YAMLError:
    old = _ABSENT
  # Compared as loaded YAML, so tuples and lists (or a re-formatted file) are equal.
  changes = config_changes(old, yaml.safe_load(text))
  if not changes:
    return []
  kept, n = path.with_name(f"config.step-{step}.yaml"), 0
  while kept.exists():   # resumed from the same step twice: never overwrite a kept config
    n += 1
    kept = path.with_name(f"config.step-{step}.{n}.yaml")
  paths.write_atomic(kept, old_text)
  paths.write_atomic(path, text)
  logger.warning("the config differs from the run's previous one (kept as %s): %s", kept.name,
                 "; ".join(changes))
  return changes
