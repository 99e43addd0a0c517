"""Which JAX backends a command starts: the TPU backend only where there are TPU chips.

With libtpu installed (`csd-jax[tpu]`, which `csd-jax compile` needs) on a machine without TPU
chips, every JAX start tries the TPU backend, prints libtpu's warnings (worker hostnames,
accelerator type) and falls back to the CPU about a second later. `skip_absent_tpu` avoids that
by naming the CPU backend, before JAX starts a backend; a `JAX_PLATFORMS` the user set wins,
and so does a CUDA plugin (a GPU host chooses its own backends). Imports no JAX.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"   # TPU chips are Google PCI devices


def tpu_chips_present() -> bool:
  """Whether this machine has TPU chips (device files, or Google PCI devices)."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def skip_absent_tpu() -> None:
  """Name the CPU backend when libtpu is installed but no TPU chip is here (see above)."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    return
  if tpu_chips_present():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:   # imported, but no backend started yet: the config reads it then
    sys.modules["jax"].config.update("jax_platforms", "cpu")
