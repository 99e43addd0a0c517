"""One process of a 2-process loader run (tests/test_loader.py starts two of these).

    python tests/loader_process_main.py PROCESS_ID PORT OUT_JSON

Each process has 2 CPU devices; the 4 devices form a ('data',) mesh. The process loads its
slice of 64 records through `BatchLoader` into global batches of 8 rows and writes what it
saw: the record ids of its local rows and the global batches' shapes.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from csd_jax.data.loader import BatchLoader, LoaderConfig  # noqa: E402


def encode(record):
  n = int(record["text"]) % 5 + 1 + 64 * (int(record["text"]) % 2)  # lengths differ by process
  return {"input_ids": np.full(n, int(record["text"]), np.int32),
          "labels": np.zeros(n, np.int32)}


def main(process_id: int, port: int, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  source = [{"text": str(i)} for i in range(64)]
  loader = BatchLoader(source, encode, pad_id=-1, sharding=sharding,
                       config=LoaderConfig(global_batch_size=8, max_length=128, seed=3))
  seen, shapes = [], []
  for _ in range(8):  # one epoch: 64 records / 8 rows
    batch = next(loader)
    shapes.append(list(batch["input_ids"].shape))
    for shard in batch["input_ids"].addressable_shards:
      seen += [int(row[0]) for row in np.asarray(shard.data)]
  with open(out, "w") as f:
    json.dump({"seen": seen, "shapes": shapes, "steps_per_epoch": loader.steps_per_epoch}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
