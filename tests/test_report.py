"""`csd-jax report`: Table 1 from hand-written `eval_results.json` files (no model is run)."""

import csv
import io
import json

import numpy as np
import pytest

from csd_jax.errors import UserError
from csd_jax.eval.report import build_table, load_results, run_report, to_csv, to_markdown

SEEDS = (10, 20, 30)
# A set of its own first, an alias ("self-inst"), a canonical name.
BASE = {"mydata": [5.0, 6.0, 7.25], "dolly": [20.0, 22.0, 24.5], "self-inst": [10.0, 12.5, 11.0],
        "vicuna": [13.0, 14.5, 14.0]}
# No SelfInst; "Dolly" in another case.
CSD = {"vicuna": [15.0, 16.0, 14.0], "Dolly": [25.0, 26.5, 27.0], "mydata": [6.0, 6.5, 7.0]}


def _entry(values, seeds=SEEDS):
  """One set's results as `generation.evaluate` writes them (samples keyed by seed)."""
  return {"rougeL": float(np.mean(values)), "rougeL_per_seed": list(values), "self_bleu": 3.0,
          "perplexity": 12.0, "examples": 2, "sampling": {"temperature": 1.0}, "stop_ids": [0],
          "samples": {str(s): ["an answer", "another"] for s in seeds}}


def _write(directory, sets, seeds=SEEDS):
  directory.mkdir(parents=True)
  (directory / "eval_results.json").write_text(
      json.dumps({name: _entry(v, seeds) for name, v in sets.items()}))
  return directory


@pytest.fixture
def runs(tmp_path):
  return _write(tmp_path / "base", BASE), _write(tmp_path / "runs" / "csd", CSD)


def _stats(values):
  return np.mean(values), np.std(values, ddof=1)


def test_cells_are_mean_and_sample_std_and_the_paper_sets_come_first(runs):
  table = build_table(dict(load_results(str(r)) for r in runs))
  # The paper's order (Dolly, SelfInst, Vicuna) whoever has them, aliases folded, then others.
  assert table.columns == ("dolly", "self_inst", "vicuna", "mydata")
  assert table.labels == ("Dolly", "SelfInst", "Vicuna", "mydata")
  assert [row.method for row in table.rows] == ["base", "csd"]
  base, csd = table.rows
  for column, name in [("dolly", "dolly"), ("self_inst", "self-inst"), ("vicuna", "vicuna"),
                       ("mydata", "mydata")]:
    mean, std = _stats(BASE[name])
    assert base.cells[column].mean == pytest.approx(mean)
    assert base.cells[column].std == pytest.approx(std)
    assert base.cells[column].seeds == ("10", "20", "30")
  assert csd.cells["dolly"].mean == pytest.approx(np.mean(CSD["Dolly"]))
  assert csd.cells["self_inst"] is None


def test_avg_is_the_spread_of_per_seed_averages(runs):
  base, _ = build_table(dict(load_results(str(r)) for r in runs)).rows
  per_seed = np.mean(list(BASE.values()), axis=0)
  mean, std = _stats(per_seed)
  assert base.avg.mean == pytest.approx(mean) and base.avg.std == pytest.approx(std)
  assert not base.partial and not base.unpaired
  # The std of the average, not the mean of the sets' stds.
  assert base.avg.std != pytest.approx(np.mean([_stats(v)[1] for v in BASE.values()]))


def test_avg_pairs_values_by_seed_not_by_position():
  sets = {"dolly": {**_entry([1.0, 2.0, 3.0])},
          "vicuna": {**_entry([30.0, 10.0, 20.0], seeds=(30, 10, 20))}}
  row, = build_table({"m": sets}).rows
  # Seed 10: (1 + 10) / 2, seed 20: (2 + 20) / 2, seed 30: (3 + 30) / 2.
  assert row.avg.values == pytest.approx([5.5, 11.0, 16.5])
  assert row.avg.std == pytest.approx(np.std([5.5, 11.0, 16.5], ddof=1))


def test_a_run_missing_a_set_gets_a_dash_and_a_marked_partial_average(runs):
  table = build_table(dict(load_results(str(r)) for r in runs))
  _, csd = table.rows
  per_seed = np.mean(list(CSD.values()), axis=0)
  assert csd.partial and csd.avg.mean == pytest.approx(per_seed.mean())
  markdown = to_markdown(table)
  csd_line = next(line for line in markdown.splitlines() if line.startswith("| csd "))
  cells = [c.strip() for c in csd_line.strip("|").split("|")]
  assert cells[2] == "–" and cells[1] != "–"
  assert cells[-1] == f"{per_seed.mean():.2f} ± {np.std(per_seed, ddof=1):.2f}*"
  assert "\\* Avg. over the sets the row has" in markdown


def test_markdown_has_the_seeds_header_and_two_decimal_cells(runs):
  markdown = run_report([str(r) for r in runs])
  lines = markdown.splitlines()
  assert lines[0] == "ROUGE-L, mean ± std over 3 seeds (seeds 10, 20, 30)."
  assert lines[2] == "| Method | Dolly | SelfInst | Vicuna | mydata | Avg. |"
  assert lines[3] == "|:--|--:|--:|--:|--:|--:|"
  mean, std = _stats(BASE["dolly"])
  assert lines[4].startswith(f"| base | {mean:.2f} ± {std:.2f} | ")
  assert "| 22.17 ± 2.25 |" in lines[4]       # dolly by hand: mean 66.5 / 3, std 2.2546...
  assert "†" not in markdown


def test_csv_round_trips_the_numbers(runs):
  table = build_table(dict(load_results(str(r)) for r in runs))
  rows = list(csv.DictReader(io.StringIO(to_csv(table))))
  assert list(rows[0]) == ["method", "dolly_mean", "dolly_std", "self_inst_mean",
                           "self_inst_std", "vicuna_mean", "vicuna_std", "mydata_mean",
                           "mydata_std", "avg_mean", "avg_std"]
  base, csd = rows
  mean, std = _stats(BASE["self-inst"])
  assert float(base["self_inst_mean"]) == pytest.approx(mean)
  assert float(base["self_inst_std"]) == pytest.approx(std)
  assert csd["self_inst_mean"] == "" and csd["self_inst_std"] == ""
  per_seed = np.mean(list(CSD.values()), axis=0)
  assert float(csd["avg_mean"]) == pytest.approx(per_seed.mean())
  assert float(csd["avg_std"]) == pytest.approx(np.std(per_seed, ddof=1))


def test_run_report_writes_markdown_and_csv_beside_it(runs, tmp_path):
  sources = [f"baseline={runs[0]}", str(runs[1] / "eval_results.json")]
  markdown = run_report(sources, str(tmp_path / "out" / "deep" / "table1.md"))
  assert (tmp_path / "out" / "deep" / "table1.md").read_text() == markdown
  assert "| baseline |" in markdown and "| csd |" in markdown
  written = (tmp_path / "out" / "deep" / "table1.csv").read_text()
  assert written.splitlines()[1].startswith("baseline,")
  run_report(sources, str(tmp_path / "other" / "t.csv"))
  assert (tmp_path / "other" / "t.csv").read_text() == written
  assert (tmp_path / "other" / "t.md").read_text() == markdown


def test_one_seed_shows_the_mean_alone(tmp_path):
  run = _write(tmp_path / "one", {"dolly": [20.0], "uinst": [30.0]}, seeds=(10,))
  markdown = run_report([str(run)])
  assert markdown.splitlines()[0] == "ROUGE-L, mean over 1 seed (seed 10)."
  assert "| one | 20.00 | 30.00 | 25.00 |" in markdown
  assert to_csv(build_table(dict([load_results(str(run))]))).splitlines()[1] == (
      "one,20.0,,30.0,,25.0,")


def test_sets_with_different_seeds_average_means_without_std(tmp_path):
  run = tmp_path / "mixed"
  run.mkdir()
  (run / "eval_results.json").write_text(json.dumps(
      {"sni": _entry([10.0, 12.0], seeds=(10, 20)), "unni": _entry([20.0, 22.0], seeds=(10, 30))}))
  table = build_table(dict([load_results(str(run))]))
  assert table.labels == ("S-NI", "UnNI")
  row, = table.rows
  assert row.unpaired and row.avg.std is None and row.avg.mean == pytest.approx(16.0)
  markdown = to_markdown(table)
  assert "| 16.00† |" in markdown and "† the row's sets" in markdown
  assert "differ between cells (mixed: S-NI 10, 20; UnNI 10, 30)" in markdown.splitlines()[0]


def test_names_come_from_the_directory_file_or_name(runs, tmp_path):
  base, csd = runs
  assert load_results(str(base))[0] == "base"
  assert load_results(str(csd / "eval_results.json"))[0] == "csd"
  (tmp_path / "step_100.json").write_text((base / "eval_results.json").read_text())
  assert load_results(str(tmp_path / "step_100.json"))[0] == "step_100"
  assert load_results(f"CSD (ours)={csd}")[0] == "CSD (ours)"
  sweep = _write(tmp_path / "lr=1e-3", BASE)            # a path with "=" is a path
  assert load_results(str(sweep))[0] == "lr=1e-3"


def test_errors_name_the_path_and_the_fix(runs, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(UserError, match=r"empty: no eval_results.json .*csd-jax eval --workdir"):
    load_results(str(empty))
  with pytest.raises(UserError, match=r"nothing.json: no such run directory or results file"):
    load_results(str(tmp_path / "nothing.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(UserError, match=r"bad.json: not valid JSON .*csd-jax eval --workdir"):
    load_results(str(tmp_path / "bad.json"))
  (tmp_path / "old.json").write_text(json.dumps({"dolly": {"rougeL": 20.0}}))
  with pytest.raises(UserError, match=r"old.json: set 'dolly' has no rougeL_per_seed"):
    load_results(str(tmp_path / "old.json"))
  with pytest.raises(UserError, match=r"expected PATH or NAME=PATH"):
    load_results("=somewhere")


def test_duplicate_names_and_duplicate_sets_are_refused(runs, tmp_path):
  base, _ = runs
  with pytest.raises(UserError, match=r"two runs are named 'base' .*NAME=PATH, e.g. base-1="):
    run_report([str(base), str(base / "eval_results.json")])
  run_report([f"a={base}", f"b={base}"])                # named apart, the same run is fine
  with pytest.raises(UserError, match=r"both 'dolly' and 'Dolly', the same set"):
    build_table({"m": {"dolly": _entry([1.0, 2.0, 3.0]), "Dolly": _entry([1.0, 2.0, 3.0])}})
