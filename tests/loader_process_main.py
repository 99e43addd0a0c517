"""One process of a 2-process loader run (tests/test_loader.py starts two of these).

    python tests/loader_process_main.py PROCESS_ID PORT OUT_JSON

Each process has 2 CPU devices; the 4 devices form a ('data',) mesh. The process loads its
slice of 64 records through `BatchLoader` into global batches of 8 rows for 20 batches (2.5
epochs) and writes what it saw: the record ids of its local rows, the global batches' shapes,
and how many host collectives (every public function of `jax.experimental.multihost_utils`,
counted by wrapping them) the loader issued at construction and over the batches. Then, as
checks: a loader restored from the state after 5 batches (same next batches?) and, as the
counter's positive control, the older per-batch all-gather agreement over the same batches.
"""

import functools
import json
import os
import sys

from cpu_devices import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(2)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from csd_jax.data.loader import BatchLoader, LoaderConfig  # noqa: E402

BATCHES = 20
CALLS: list[str] = []


DEPTH = [0]


def _count(name, fn):
  @functools.wraps(fn)
  def counted(*args, **kwargs):
    if DEPTH[0] == 0:   # the outermost call: process_allgather calls others of the module
      CALLS.append(name)
    DEPTH[0] += 1
    try:
      return fn(*args, **kwargs)
    finally:
      DEPTH[0] -= 1
  return counted


for _name in dir(multihost_utils):   # whatever the loader could use to talk to the others
  if not _name.startswith("_") and callable(getattr(multihost_utils, _name)):
    setattr(multihost_utils, _name, _count(_name, getattr(multihost_utils, _name)))


def encode(record):
  # One record in 8 is long: some global batches hold none, others one, on one process only.
  n = int(record["text"]) % 5 + 1 + 64 * (int(record["text"]) % 8 == 1)
  return {"input_ids": np.full(n, int(record["text"]), np.int32),
          "labels": np.zeros(n, np.int32)}


def _host(batch):
  """This process's rows of a global batch, as NumPy."""
  return {k: np.concatenate([np.asarray(s.data) for s in v.addressable_shards])
          for k, v in batch.items()}


def main(process_id: int, port: int, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  source = [{"text": str(i)} for i in range(64)]
  config = LoaderConfig(global_batch_size=8, max_length=128, seed=3)

  def make():
    return BatchLoader(source, encode, pad_id=-1, sharding=sharding, config=config)

  CALLS.clear()
  loader = make()
  construction = len(CALLS)
  CALLS.clear()
  seen, shapes, host, state = [], [], [], None
  for i in range(BATCHES):
    if i == 5:
      state = json.loads(json.dumps(loader.get_state()))
    global_batch = next(loader)
    shapes.append(list(global_batch["input_ids"].shape))
    batch = _host(global_batch)
    host.append(batch)
    seen += [int(row[0]) for row in batch["input_ids"]] if i < 8 else []  # epoch 1: 8 batches
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
  batches = len(CALLS)

  restored = make()
  restored.set_state(state)
  CALLS.clear()
  differ = []   # the batches a restored loader gets otherwise
  for i in range(5, BATCHES):
    got = _host(next(restored))
    if not all(np.array_equal(got[k], host[i][k]) for k in host[i]):
      differ.append(i)
  restored_batches = len(CALLS)

  old = make()
  old._gather_every_batch = True   # the per-batch all-gather of older versions
  CALLS.clear()
  old_shapes = [list(next(old)["input_ids"].shape) for _ in range(BATCHES)]
  old_batches = len(CALLS)
  with open(out, "w") as f:
    json.dump({"seen": seen, "shapes": shapes, "old_shapes": old_shapes,
               "steps_per_epoch": loader.steps_per_epoch, "restored_differ": differ,
               "collectives": {"construction": construction, "batches": batches,
                               "restored_batches": restored_batches,
                               "old_batches": old_batches}}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
