"""The XLA flags of the test processes: fake CPU devices, and quick compiles.

LLVM at -O0 (`--xla_backend_optimization_level=0`): the tests' programs are tiny, so compiling
them is most of the suite's time, and -O0 compiles a tiny train step in about half the time
(bench-free measurement: configs/tiny.yaml's 30 steps, 28.6 s -> 15.7 s, compile included).
Matmuls are library calls at any level; only fused elementwise code is less optimised.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, *, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices (and -O0 unless the process
  runs more than it compiles: fast_compile=False)."""
  flags = f"--xla_force_host_platform_device_count={devices}"
  return f"{flags} {FAST_COMPILE}" if fast_compile else flags
