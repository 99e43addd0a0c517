"""TPU slices by name (`v5e-8`, `v5p-128`, `v6e-256`): their chips, hosts and per-chip figures.

    spec = SLICES["v5e-8"]      # 8 chips of 16 GiB, one host, 197 TFLOP/s bf16 each
    devices = slice_devices(spec, num_slices=1)   # the chips, from libtpu, without owning them

The names follow Google Cloud's accelerator types: v5e (v5litepod) and v6e count chips, v4 and
v5p count TensorCores (two per chip, one JAX device per chip: `v5p-8` is 4 chips). Slices of
up to 8 chips (v5e, v6e) or 4 chips (v4, v5p) are one host; larger ones have 4 chips per host.
The per-chip figures are the published ones (HBM capacity, peak dense bf16 FLOP/s, HBM
bandwidth); the compiler keeps a little of the HBM for itself (a v5e chip's usable HBM is
15.75 GiB).

This module imports no JAX at import time: the config check reads `SLICES` without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any

from csd_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip."""

  generation: str          # as libtpu names the topology: v4, v5e, v5p, v6e
  hbm_bytes: int
  peak_bf16_flops: float   # dense, per chip
  hbm_bandwidth: float     # bytes/s, per chip
  cores_in_name: int       # TensorCores the slice's name counts per chip (v4, v5p: 2)
  chip_config: str         # libtpu's chip configuration (v4: one device per chip, "megacore")


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1, "default"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, "default"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, "default"),
}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """A named slice: its chip, the topology string libtpu takes, and its hosts."""

  name: str
  chip: Chip
  topology: tuple[int, ...]          # chips along each axis, e.g. (2, 4) or (2, 2, 4)
  chips_per_host: tuple[int, ...]    # the host's chip bounds, same rank padded to 3

  @property
  def chips(self) -> int:
    return math.prod(self.topology)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host)

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(map(str, self.topology))}"


def _slices() -> dict[str, SliceSpec]:
  table = {}
  two_d = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
           256: (16, 16)}
  for generation in ("v5e", "v6e"):
    for chips, shape in two_d.items():
      host = (*shape, 1) if chips <= 8 else (2, 2, 1)
      table[f"{generation}-{chips}"] = SliceSpec(f"{generation}-{chips}", CHIPS[generation],
                                                 shape, host)
  three_d = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}
  for generation in ("v4", "v5p"):
    chip = CHIPS[generation]
    for chips, shape in three_d.items():
      name = f"{generation}-{chips * chip.cores_in_name}"
      table[name] = SliceSpec(name, chip, shape, (2, 2, 1))
  return table


SLICES: dict[str, SliceSpec] = _slices()


def slice_spec(name: str) -> SliceSpec:
  """The named slice.

  Raises:
    UserError: an unknown name (the known ones listed).
  """
  if name not in SLICES:
    raise UserError(f"unknown TPU slice {name!r}; known slices: {', '.join(SLICES)}")
  return SLICES[name]


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
  """Raises UserError when libtpu (the TPU compiler) is not installed."""
  if not libtpu_installed():
    raise UserError("csd-jax compile needs libtpu, the TPU compiler (it runs on a machine "
                    "without TPUs); install it with pip install 'csd-jax[tpu]'")


# libtpu looks for a TPU VM's metadata server and worker hostnames at start-up, and warns at
# length where there is none; compiling for a slice we do not own needs neither.
_DEVICELESS_ENV = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                   "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-8"}


def slice_devices(spec: SliceSpec, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of `spec`, for compiling only (no chip is needed)."""
  require_libtpu()
  if num_slices < 1:
    raise UserError(f"--slices {num_slices}: must be >= 1")
  for key, value in _DEVICELESS_ENV.items():
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  bounds = tuple(spec.chips_per_host) + (1,) * (3 - len(spec.chips_per_host))
  description = topologies.get_topology_desc(
      platform="tpu", topology_name=spec.topology_name, chip_config_name=spec.chip.chip_config,
      chips_per_host_bounds=bounds, num_slices=num_slices, wrap=(False, False, False))
  return list(description.devices)
