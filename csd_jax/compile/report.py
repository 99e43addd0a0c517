"""What the TPU compiler says about a run's programs: memory per chip, cost, collectives.

    report = compile_programs(programs, spec, num_slices)
    print(format_report(report)); json.dumps(report_json(report))

Memory is per chip (`memory_analysis()` of the SPMD program): arguments, outputs, temporaries;
the total is what the chip must hold at once (arguments + outputs - the donated aliases +
temporaries), against the chip's HBM. A program the compiler cannot fit fails to compile with
RESOURCE_EXHAUSTED: the report then says "does not fit" with the compiler's own figures. Cost is
the compiler's (`cost_analysis()`: FLOPs, bytes accessed, `optimal_seconds`), per chip; XLA counts
a loop's body once, so `optimal_seconds` and the tokens/s and MFU it implies are only given for a
program without loops (grad_accum > 1, the fused loss's chunk loop, decoding all make loops),
and only where that estimate is positive (it can be negative: a data-parallel GPT-2-XL step's).
Collectives are read from the optimized HLO (count and result bytes by kind, a loop body's
once).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from csd_jax.compile.program import Programs
from csd_jax.compile.topologies import GiB, SliceSpec

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(?P<shape>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES)
                         + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8e\w+)\[(?P<dims>[\d,]*)\]")
_BITS = re.compile(r"\d+")
_OOM = re.compile(r"required for HLO temporaries \((?P<temp>[\d.]+)G\) exceeds available HBM "
                  r"\((?P<hbm>[\d.]+)G\)")


@dataclasses.dataclass
class ProgramReport:
  name: str
  compile_s: float
  fits: bool
  error: str | None = None            # the compiler's message when it did not compile
  memory: dict[str, int] = dataclasses.field(default_factory=dict)   # per chip, bytes
  flops: float | None = None
  bytes_accessed: float | None = None
  optimal_seconds: float | None = None   # None: the program has loops (not meaningful)
  collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
  hlo: str = ""


@dataclasses.dataclass
class FitReport:
  slice: SliceSpec
  num_slices: int
  mesh_shape: dict[str, int]
  parts: dict[str, int]
  tokens_per_step: int
  programs: list[ProgramReport]

  @property
  def fits(self) -> bool:
    return all(p.fits for p in self.programs)


def _array_bytes(text: str) -> list[int]:
  sizes = []
  for match in _ARRAY.finditer(text):
    dtype = match["dtype"]
    bits = 1 if dtype == "pred" else 16 if dtype == "bf16" else (
        8 if dtype.startswith("f8") else int(_BITS.search(dtype)[0]))
    count = 1
    for dim in filter(None, match["dims"].split(",")):
      count *= int(dim)
    sizes.append(count * max(bits, 8) // 8)
  return sizes


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """Kind -> (count, bytes of the results) of the collectives in optimized HLO text (an async
  `-start` counts its result, the largest buffer of its tuple)."""
  out: dict[str, list[int]] = {}
  for match in _COLLECTIVE.finditer(hlo):
    sizes = _array_bytes(match["shape"])
    size = max(sizes, default=0) if match["start"] else sum(sizes)
    entry = out.setdefault(match["op"], [0, 0])
    entry[0] += 1
    entry[1] += size
  return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes}
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"])
  return memory


def _first_line(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0][:400] if lines else type(error).__name__


def compile_program(name: str, lowered: Any, hbm_bytes: int) -> ProgramReport:
  """Compile one lowered program and read the compiler's figures; a program that does not
  compile (out of HBM, or a compiler error) is reported, not raised."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as error:   # XlaRuntimeError / JaxRuntimeError: the compiler's verdict
    message = _first_line(error)
    report = ProgramReport(name, time.perf_counter() - start, fits=False, error=message)
    if (oom := _OOM.search(str(error))) is not None:
      report.memory = {"temporaries": int(float(oom["temp"]) * GiB),
                       "usable": int(float(oom["hbm"]) * GiB)}
    return report
  seconds = time.perf_counter() - start
  memory = _memory(compiled)
  hlo = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  loops = " while(" in hlo
  return ProgramReport(
      name, seconds, fits=memory["total"] <= hbm_bytes, memory=memory,
      flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
      optimal_seconds=None if loops else cost.get("optimal_seconds"),
      collectives=collectives(hlo), hlo=hlo)


def compile_programs(programs: Programs, spec: SliceSpec, num_slices: int = 1,
                     progress: Any = None) -> FitReport:
  """Compile every program of `programs` for the slice; `progress(name)` before each."""
  reports = []
  for name, lowered in programs.lowered.items():
    if progress is not None:
      progress(name)
    reports.append(compile_program(name, lowered, spec.chip.hbm_bytes))
  return FitReport(spec, num_slices, dict(programs.mesh.shape), programs.parts,
                   programs.tokens_per_step, reports)


# ---- output ------------------------------------------------------------------------------------

def _size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def _program_lines(report: FitReport, program: ProgramReport) -> list[str]:
  chip = report.slice.chip
  lines = [f"{program.name}: compiled in {program.compile_s:.1f} s" if program.error is None
           else f"{program.name}: did not compile in {program.compile_s:.1f} s"]
  memory = program.memory
  if program.error is not None:
    lines.append(f"  compiler: {program.error}")
    if "temporaries" in memory:
      lines.append(f"  temporaries {_size(memory['temporaries'])} > usable "
                   f"{_size(memory['usable'])}: does not fit")
    return lines
  headroom = chip.hbm_bytes - memory["total"]
  lines.append(f"  per chip: arguments {_size(memory['arguments'])}, outputs "
               f"{_size(memory['outputs'])} (aliased {_size(memory['aliased'])}), temporaries "
               f"{_size(memory['temporaries'])}; total {_size(memory['total'])} of "
               f"{_size(chip.hbm_bytes)}: " + ("fits" if program.fits else "does NOT fit")
               + f", headroom {_size(headroom)} ({100 * headroom / chip.hbm_bytes:.0f}%)")
  if program.flops is not None:
    cost = f"  cost per chip: {program.flops / 1e12:.3f} TFLOP, " + (
        f"{(program.bytes_accessed or 0) / 1e9:.2f} GB accessed")
    if program.optimal_seconds is None:
      cost += "; optimal_seconds: n/a (the program has loops, whose body XLA counts once)"
    elif program.optimal_seconds <= 0:
      cost += (f"; optimal_seconds: n/a (the compiler's estimate, "
               f"{program.optimal_seconds:.3g} s, is not positive)")
    else:
      cost += f"; optimal {program.optimal_seconds * 1e3:.2f} ms"
      if program.name == "train_step":
        tokens_s = report.tokens_per_step / program.optimal_seconds
        mfu = program.flops / (program.optimal_seconds * chip.peak_bf16_flops)
        cost += f" -> {tokens_s:,.0f} tokens/s, MFU {100 * mfu:.0f}%"
    lines.append(cost)
  if program.collectives:
    lines.append("  collectives: " + ", ".join(
        f"{kind} {count} ({size / 1e6:.1f} MB)"
        for kind, (count, size) in program.collectives.items()))
  return lines


def format_report(report: FitReport) -> str:
  """The report as text: the slice, the per-chip inputs by part, then each program."""
  spec = report.slice
  slices = f" x {report.num_slices} slices" if report.num_slices > 1 else ""
  lines = [f"{spec.name}{slices}: {spec.chips * report.num_slices} chips "
           f"({spec.hosts * report.num_slices} hosts), {_size(spec.chip.hbm_bytes)} HBM per chip; "
           "mesh " + ", ".join(f"{k}={v}" for k, v in report.mesh_shape.items()),
           "inputs per chip: " + ", ".join(f"{part} {_size(size)}"
                                           for part, size in report.parts.items())]
  for program in report.programs:
    lines.extend(_program_lines(report, program))
  lines.append("fits" if report.fits else "does NOT fit")
  return "\n".join(lines)


def report_json(report: FitReport) -> dict[str, Any]:
  """The report as JSON-ready data (without the HLO text)."""
  spec = report.slice
  return {
      "slice": spec.name, "num_slices": report.num_slices, "chips": spec.chips * report.num_slices,
      "hosts": spec.hosts * report.num_slices, "hbm_bytes_per_chip": spec.chip.hbm_bytes,
      "peak_bf16_flops_per_chip": spec.chip.peak_bf16_flops, "mesh": report.mesh_shape,
      "inputs_per_chip": report.parts, "tokens_per_step": report.tokens_per_step,
      "fits": report.fits,
      "programs": [{k: v for k, v in dataclasses.asdict(p).items() if k != "hlo"}
                   for p in report.programs]}
