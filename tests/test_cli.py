"""The command line: bad arguments fail with a clear message (in this process: `run_cli`)."""


def test_cli_rejects_unknown_loss(run_cli):
  code, _, err = run_cli("demo", "--loss", "kld")
  assert code == 2
  assert "invalid choice: 'kld'" in err


def test_cli_report_prints_the_table_and_names_a_missing_run(tmp_path, run_cli):
  import json

  run = tmp_path / "csd"
  run.mkdir()
  (run / "eval_results.json").write_text(json.dumps({"dolly": {
      "rougeL": 21.0, "rougeL_per_seed": [20.0, 22.0], "samples": {"10": [], "20": []}}}))
  code, out, err = run_cli("report", run, "--out", tmp_path / "t.md")
  assert code == 0, err
  assert "| csd | 21.00 ± 1.41 |" in out and (tmp_path / "t.csv").is_file()
  code, _, err = run_cli("report", tmp_path / "absent")
  assert code == 2 and "absent" in err
  assert len(err.strip().splitlines()) == 1
