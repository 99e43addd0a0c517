"""Multi-host start-up: `jax.distributed.initialize` from the environment, when there is one.

- `CSD_JAX_COORDINATOR` (host:port), `CSD_JAX_NUM_PROCESSES`, `CSD_JAX_PROCESS_ID`: explicit
  (launch/local_multiprocess.sh sets them; any cluster can);
- SLURM with more than one task, or a multi-host TPU slice: JAX's own auto-detection;
- otherwise a single process: nothing to do.

On CPU, collectives between processes go through gloo.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from csd_jax.errors import UserError

logger = logging.getLogger("csd_jax.runtime.distributed")


def _multi_host_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([w for w in workers.split(",") if w]) > 1


def initialize() -> None:
  """Join the other processes of this run, if it has any (idempotent)."""
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get("CSD_JAX_COORDINATOR")
  if coordinator:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      num_processes = int(os.environ["CSD_JAX_NUM_PROCESSES"])
      process_id = int(os.environ["CSD_JAX_PROCESS_ID"])
    except (KeyError, ValueError) as error:
      raise UserError("CSD_JAX_COORDINATOR is set: also set CSD_JAX_NUM_PROCESSES and "
                      "CSD_JAX_PROCESS_ID (integers)") from error
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  elif _multi_host_cluster():
    jax.distributed.initialize()
  else:
    return
  logger.info("process %d of %d, %d local / %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())


def allgather(value: np.ndarray) -> np.ndarray:
  """[process_count, ...] of every process's `value`: a host-level all-gather."""
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(value))


def from_every_process(obj: Any) -> list[Any]:
  """`obj` (JSON-able) of every process, in process order (a host-level all-gather)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(gathered[i][:int(sizes[i])]).decode()) for i in range(len(sizes))]
