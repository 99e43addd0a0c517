"""`csd-jax compile --config C [--topology v5e-8] [--slices N] [--out DIR] [--must-fit]`.

Builds what `csd-jax train` would build from the config, from abstract models and data, and
compiles it for the slice (`--topology`, else the config's `mesh.slice`) with the real TPU
compiler, on any machine with libtpu installed. Prints the per-chip report; `--out DIR` writes
`report.json` and each program's optimized HLO (`<program>.hlo.txt`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence

from csd_jax.compile.topologies import require_libtpu, slice_devices, slice_spec
from csd_jax.config import Config, load_config
from csd_jax.errors import UserError
from csd_jax.runtime import paths

logger = logging.getLogger("csd_jax.compile")


@dataclasses.dataclass(frozen=True)
class CompileRequest:
  config: str
  overrides: Sequence[str] = ()
  topology: str | None = None     # default: the config's mesh.slice
  num_slices: int = 1
  out: str | None = None


def slice_name(config: Config, topology: str | None) -> str:
  """The slice to compile for: `--topology`, else the config's `mesh.slice`."""
  name = topology or config.mesh.slice
  if not name:
    raise UserError("no TPU slice to compile for: pass --topology (e.g. v5e-8) or set "
                    "mesh.slice in the config")
  return name


def run_compile(request: CompileRequest):
  """Compile the run of `request.config` for its slice; the `FitReport`."""
  from csd_jax.compile.program import lower_programs
  from csd_jax.compile.report import compile_programs, report_json

  require_libtpu()
  config = load_config(request.config, list(request.overrides))
  spec = slice_spec(slice_name(config, request.topology))
  start = time.perf_counter()
  devices = slice_devices(spec, request.num_slices)
  logger.info("lowering the run's programs for %s (%d chips)", spec.name, len(devices))
  programs = lower_programs(config, devices)
  report = compile_programs(programs, spec, request.num_slices,
                            progress=lambda name: logger.info("compiling %s for %s ...", name,
                                                              spec.name))
  logger.info("done in %.0f s", time.perf_counter() - start)
  if request.out:
    out = paths.as_path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(out / "report.json", json.dumps(report_json(report), indent=2))
    for program in report.programs:
      if program.hlo:
        paths.write_atomic(out / f"{program.name}.hlo.txt", program.hlo)
  return report
