"""`csd-jax report`: the paper's Table 1 (ROUGE-L per evaluation set) from `csd-jax eval` runs.

Each source is a run directory (its `eval_results.json`), a results JSON file (what `csd-jax
eval --out` or a training run's `W/eval/step_<N>.json` hold), or `NAME=PATH` to name the row.
One row per source, in the order given; the columns are the paper's five sets in its order
(Dolly, SelfInst, Vicuna, S-NI, UnNI; common spellings such as `self-inst`, `sni`, `un-ni`
land in the same column), then any other sets in first-seen order, then "Avg.".

The numbers, and why:
- A cell is the mean ± the sample standard deviation (ddof = 1) of the run's per-seed ROUGE-L:
  the seeds are a small sample of the sampling noise, and ddof = 0 would understate it. One
  seed has no spread: the cell shows the mean alone (no "± 0.00", which would claim one).
- "Avg." is over every column the row has, the sets beyond the paper's five included (leave a
  set out of the sources' JSON to keep it out). It pairs the seeds: for each seed, the mean over
  the row's sets, then mean ± std of those per-seed averages (the std of the average, usually
  smaller than the sets' stds). That needs every set of the row to have been sampled with the
  same seeds (`samples`' keys); otherwise (or when the seeds are not recorded) it is the mean of
  the per-set means, without std, marked "†".
- A row missing a set shows "–" there; its Avg. is over the sets it has, marked "*": a mean
  over other sets is not comparable with the complete rows', and a blank would hide a number
  the user may still want. The CSV carries it unmarked: its empty cells show which sets it lacks.
- Markdown rounds to 2 decimals as the paper does; the CSV keeps full precision.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from csd_jax.runtime import paths
from csd_jax.errors import UserError

# The paper's sets in its column order: canonical name -> column label.
PAPER_SETS = {"dolly": "Dolly", "self_inst": "SelfInst", "vicuna": "Vicuna", "sinst": "S-NI",
              "uinst": "UnNI"}
# Spellings of the paper's sets (lower case, without "-", "_", ".", spaces) -> canonical name.
_ALIASES = {"dolly": "dolly", "dollytest": "dolly", "selfinst": "self_inst",
            "selfinstruct": "self_inst", "vicuna": "vicuna", "sinst": "sinst", "sni": "sinst",
            "superni": "sinst", "supernaturalinstructions": "sinst", "uinst": "uinst",
            "unni": "uinst", "unnatural": "uinst", "unnaturalinstructions": "uinst"}
RESULTS_FILE = "eval_results.json"
_EVAL_HINT = "run `csd-jax eval --workdir W --data NAME=FILE ...` (it writes W/eval_results.json)"
MISSING = "–"


@dataclasses.dataclass(frozen=True)
class Cell:
  """ROUGE-L of one run on one set (or a row's average): the per-seed values and their summary.
  `seeds` is None when unknown (the results record no samples, or a "†" average)."""

  mean: float
  std: float | None                    # None: one value, or an average that could not pair seeds
  values: tuple[float, ...] = ()
  seeds: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Row:
  method: str
  cells: Mapping[str, Cell | None]     # by column name; None: the run lacks that set
  avg: Cell
  partial: bool                        # "*": the Avg. leaves out the sets the run lacks
  unpaired: bool                       # "†": the sets' seeds differ, Avg. is a mean of means


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows (methods) by columns (sets); `labels` are the columns' headers."""

  columns: tuple[str, ...]
  labels: tuple[str, ...]
  rows: tuple[Row, ...]


def canonical_name(name: str) -> str:
  """The paper's name of a set (`self-inst` -> `self_inst`); other names are kept as they are."""
  return _ALIASES.get(re.sub(r"[-_. ]", "", name.lower()), name)


def _problem(entry: Any) -> str | None:
  """What is wrong with one set's results, or None."""
  if not isinstance(entry, Mapping) or "rougeL_per_seed" not in entry:
    return "has no rougeL_per_seed"
  values = entry["rougeL_per_seed"]
  if (not isinstance(values, list) or not values
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 for v in values)):
    return "has a rougeL_per_seed that is not a non-empty list of finite numbers"
  return None


def _split(source: str) -> tuple[str, str]:
  """`NAME=PATH` -> (NAME, PATH); `PATH` -> ("", PATH)."""
  name, sep, path = source.partition("=")
  if not sep or paths.as_path(source).exists():
    return "", source
  if not name or not path:
    raise UserError(f"{source!r}: expected PATH or NAME=PATH, e.g. csd=runs/csd")
  return name, path


def load_results(source: str) -> tuple[str, dict[str, Any]]:
  """`NAME=PATH` or `PATH` -> (method name, the results: {set: {"rougeL_per_seed": ...}}).

  PATH is a run directory (its eval_results.json) or a results file. Without NAME, the row is
  named after the directory (for a file: its directory if it is eval_results.json, else its
  stem). A path that exists as a whole wins over splitting at "=" (`runs/lr=1e-3`)."""
  name, path_text = _split(source)
  path = paths.as_path(path_text)   # a local path or a run in a bucket (gs://...)
  if path.is_dir():
    file = path / RESULTS_FILE
    name = name or paths.absolute(path).name
    if not file.is_file():
      raise UserError(f"{path}: no {RESULTS_FILE} in the run directory; {_EVAL_HINT}")
  else:
    file = path
    name = name or (paths.absolute(path).parent.name if path.name == RESULTS_FILE
                    else path.stem)
    if not file.is_file():
      raise UserError(f"{path}: no such run directory or results file; {_EVAL_HINT}")
  try:
    results = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{file}: not valid JSON ({error}); {_EVAL_HINT} again") from None
  if not isinstance(results, dict) or not results:
    raise UserError(f"{file}: not a results object {{set: metrics}} with at least one set; "
                    f"{_EVAL_HINT}")
  for dataset, entry in results.items():
    problem = _problem(entry)
    if problem:
      raise UserError(f"{file}: set {dataset!r} {problem} (not `csd-jax eval` results, or an "
                      f"older version's); {_EVAL_HINT} again")
  return name, results


def _cell(values: Sequence[float], seeds: tuple[str, ...] | None) -> Cell:
  values = tuple(float(v) for v in values)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return Cell(mean=float(np.mean(values)), std=std, values=values, seeds=seeds)


def _seeds(entry: Mapping[str, Any]) -> tuple[str, ...] | None:
  """The seeds, in rougeL_per_seed's order: the keys of "samples" (None if not recorded)."""
  samples = entry.get("samples")
  if isinstance(samples, Mapping) and len(samples) == len(entry["rougeL_per_seed"]):
    return tuple(str(s) for s in samples)
  return None


def _average(cells: Sequence[Cell]) -> tuple[Cell, bool]:
  """(the row's Avg., whether its seeds could not be paired)."""
  if len(cells) == 1:
    return cells[0], False
  first = cells[0].seeds
  if first is not None and all(c.seeds is not None and set(c.seeds) == set(first)
                               and len(c.seeds) == len(first) for c in cells):
    by_seed = [dict(zip(c.seeds, c.values)) for c in cells]
    return _cell([np.mean([b[s] for b in by_seed]) for s in first], first), False
  return Cell(mean=float(np.mean([c.mean for c in cells])), std=None), True


def build_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
  """{method: {set: `csd-jax eval` metrics}} -> the table (see the module docstring)."""
  rows_cells: dict[str, dict[str, Cell]] = {}
  others: list[str] = []
  for method, sets in results.items():
    if not sets:
      raise UserError(f"run {method!r} has no evaluation sets; {_EVAL_HINT}")
    cells: dict[str, Cell] = {}
    spelled: dict[str, str] = {}
    for dataset, entry in sets.items():
      problem = _problem(entry)
      if problem:
        raise UserError(f"run {method!r}: set {dataset!r} {problem}; {_EVAL_HINT} again")
      column = canonical_name(dataset)
      if column in cells:
        raise UserError(f"run {method!r} has both {spelled[column]!r} and {dataset!r}, the same "
                        "set; drop or rename one in its results JSON")
      spelled[column] = dataset
      cells[column] = _cell(entry["rougeL_per_seed"], _seeds(entry))
      if column not in PAPER_SETS and column not in others:
        others.append(column)
    rows_cells[method] = cells
  present = {c for cells in rows_cells.values() for c in cells}
  columns = tuple([c for c in PAPER_SETS if c in present] + others)
  rows = []
  for method, cells in rows_cells.items():
    avg, unpaired = _average([cells[c] for c in columns if c in cells])
    rows.append(Row(method=method, cells={c: cells.get(c) for c in columns}, avg=avg,
                    partial=len(cells) < len(columns), unpaired=unpaired))
  return Table(columns=columns, labels=tuple(PAPER_SETS.get(c, c) for c in columns),
               rows=tuple(rows))


def _seed_note(table: Table) -> str:
  """The header line: how many seeds, which; per run where they differ."""
  def seeds_of(cell: Cell) -> str:
    if cell.seeds is None:
      return f"{len(cell.values)} seeds, unrecorded"
    return ", ".join(cell.seeds)

  cells = [(row, label, cell) for row in table.rows
           for label, cell in zip(table.labels, (row.cells[c] for c in table.columns)) if cell]
  kinds = {(cell.seeds, len(cell.values)) for _, _, cell in cells}
  if len(kinds) == 1:
    seeds, count = next(iter(kinds))
    spread = "mean ± std" if count > 1 else "mean"
    which = f" (seed{'s' if count > 1 else ''} {', '.join(seeds)})" if seeds is not None else ""
    return f"ROUGE-L, {spread} over {count} seed{'s' if count > 1 else ''}{which}."
  parts = []
  for row in table.rows:
    own = [(label, cell) for r, label, cell in cells if r is row]
    if len({(c.seeds, len(c.values)) for _, c in own}) == 1:
      parts.append(f"{row.method}: {seeds_of(own[0][1])}")
    else:
      parts.append(f"{row.method}: " + "; ".join(f"{lb} {seeds_of(c)}" for lb, c in own))
  return "ROUGE-L, mean ± std over seeds, which differ between cells (" + " / ".join(parts) + ")."


def _number(cell: Cell | None) -> str:
  if cell is None:
    return MISSING
  return f"{cell.mean:.2f}" if cell.std is None else f"{cell.mean:.2f} ± {cell.std:.2f}"


def to_markdown(table: Table) -> str:
  """A GitHub Markdown table with a header line (the seeds) and footnotes for "*" and "†"."""
  def escape(text: str) -> str:
    return text.replace("|", "\\|")

  lines = [_seed_note(table), "",
           "| " + " | ".join(["Method", *map(escape, table.labels), "Avg."]) + " |",
           "|:--" + "|--:" * (len(table.columns) + 1) + "|"]
  for row in table.rows:
    avg = _number(row.avg) + ("*" if row.partial else "") + ("†" if row.unpaired else "")
    lines.append("| " + " | ".join([escape(row.method),
                                    *(_number(row.cells[c]) for c in table.columns), avg]) + " |")
  notes = []
  if any(row.partial for row in table.rows):
    # Escaped: a line starting with "* " would be a list item.
    notes.append(f"\\* Avg. over the sets the row has ({MISSING}: not evaluated); not comparable "
                 "with the complete rows.")
  if any(row.unpaired for row in table.rows):
    notes.append("† the row's sets were not sampled with the same (recorded) seeds: Avg. is the "
                 "mean of the per-set means, without std.")
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def to_csv(table: Table) -> str:
  """method, `<set>_mean`, `<set>_std` per column, avg_mean, avg_std; full precision, empty
  where a set is missing or has no std."""
  def fields(cell: Cell | None) -> list[str]:
    if cell is None:
      return ["", ""]
    return [repr(cell.mean), "" if cell.std is None else repr(cell.std)]

  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["method", *(f"{c}_{s}" for c in table.columns for s in ("mean", "std")),
                   "avg_mean", "avg_std"])
  for row in table.rows:
    writer.writerow([row.method, *(f for c in table.columns for f in fields(row.cells[c])),
                     *fields(row.avg)])
  return buffer.getvalue()


def output_paths(out: str | os.PathLike) -> tuple[epath.Path, epath.Path]:
  """(Markdown path, CSV path) for `--out`: a .csv gets the Markdown beside it as .md, anything
  else is the Markdown with the CSV beside it as .csv."""
  path = paths.as_path(out)
  if path.is_dir():
    raise UserError(f"--out {out}: a directory; give a file, e.g. {path / 'table1.md'}")
  if path.suffix.lower() == ".csv":
    return path.with_suffix(".md"), path
  return path, path.with_suffix(".csv")


def run_report(sources: Sequence[str], out: str | None = None) -> str:
  """Load the sources, build the table and return its Markdown; with `out`, also write the
  Markdown and the CSV there (see `output_paths`)."""
  results: dict[str, dict[str, Any]] = {}
  origin: dict[str, str] = {}         # name -> its PATH, for the duplicate's message
  for source in sources:
    name, run = load_results(source)
    path = _split(source)[1]
    if name in results:
      raise UserError(f"two runs are named {name!r} ({origin[name]} and {path}); name them "
                      f"with NAME=PATH, e.g. {name}-1={origin[name]} {name}-2={path}")
    results[name], origin[name] = run, path
  table = build_table(results)
  markdown = to_markdown(table)
  if out is not None:
    md_path, csv_path = output_paths(out)
    for path, text in ((md_path, markdown), (csv_path, to_csv(table))):
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
  return markdown
