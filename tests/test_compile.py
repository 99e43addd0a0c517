"""`csd-jax compile`: a run compiled for a TPU slice by libtpu's compiler, without the chips.

Compiles for a TPU take seconds each on this machine even for the tiny config: the tests keep
to a few of them (a module-scoped report per slice); the paper-sized pairs are in
bench/tpu_fit.py.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from csd_jax.compile import report as report_lib
from csd_jax.compile import topologies
from csd_jax.compile.command import CompileRequest, run_compile
from csd_jax.config import ConfigError, load_config
from csd_jax.runtime import platforms

TINY = "configs/tiny.yaml"
FSDP = ["mesh.data=1", "mesh.fsdp=-1", "train.batch_size=16"]

pytestmark = pytest.mark.skipif(not topologies.libtpu_installed(),
                                reason="libtpu is not installed (pip install 'csd-jax[tpu]')")


@pytest.fixture(scope="module")
def fsdp_reports():
  """The tiny config, FSDP over every chip, compiled for a one-host v5e-8 and a 4-host v5e-16."""
  return {name: run_compile(CompileRequest(TINY, FSDP, topology=name))
          for name in ("v5e-8", "v5e-16")}


def test_tiny_run_fits_a_v5e_8_and_reports_every_program(fsdp_reports):
  report = fsdp_reports["v5e-8"]
  assert report.fits and [p.name for p in report.programs] == ["train_step", "eval_step"]
  assert report.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
  train = report.programs[0]
  assert train.error is None and 0 < train.memory["total"] < topologies.SLICES["v5e-8"].chip.hbm_bytes
  assert train.memory["aliased"] > 0              # the train state is donated
  assert train.flops > 0 and train.collectives   # FSDP gathers weights, reduces gradients
  text = report_lib.format_report(report)
  assert "v5e-8: 8 chips (1 hosts)" in text and text.endswith("fits")


def test_doubling_fsdp_halves_the_weights_per_chip(fsdp_reports):
  small, large = fsdp_reports["v5e-8"], fsdp_reports["v5e-16"]
  assert (large.slice.hosts, small.slice.hosts) == (4, 1)
  assert large.mesh_shape["fsdp"] == 16
  for part in ("teacher weights", "student parameters"):
    # matrices split 16 ways instead of 8; the small 1-D norm scales and biases stay whole
    assert 0.45 * small.parts[part] <= large.parts[part] <= 0.6 * small.parts[part], part
  assert large.programs[0].memory["arguments"] < small.programs[0].memory["arguments"]


def test_cli_writes_json_and_hlo_and_reads_the_configs_slice(run_cli, tmp_path):
  code, out, err = run_cli("compile", "--config", TINY, "--out", tmp_path / "fit",
                           "mesh.slice=v5e-4", "onpolicy.ratio=0.5", "onpolicy.mix=gkd",
                           "onpolicy.max_new_tokens=4")
  assert code == 0, err
  assert out.startswith("v5e-4: 4 chips (1 hosts)")
  saved = json.loads((tmp_path / "fit" / "report.json").read_text())
  assert saved["slice"] == "v5e-4" and saved["fits"]
  assert [p["name"] for p in saved["programs"]] == ["train_step", "eval_step", "sampler"]
  assert " while(" in (tmp_path / "fit" / "sampler.hlo.txt").read_text()   # the decode loop
  sampler = saved["programs"][2]
  assert sampler["optimal_seconds"] is None   # a loop: XLA's figure would be meaningless


def test_a_run_that_does_not_fit_is_reported_and_must_fit_fails(run_cli):
  # a student with a 2^25-row embedding: 8 GiB of float32 weights and 16 GiB of Adam moments
  huge = ["student.config.vocab_size=33554432", "teacher.config.vocab_size=33554432",
          "loss.fused=false"]
  code, out, err = run_cli("compile", "--config", TINY, "--topology", "v5e-1", *huge)
  assert code == 0, err
  assert "does NOT fit" in out.splitlines()[-1]
  code, out, _ = run_cli("compile", "--config", TINY, "--topology", "v5e-1", "--must-fit", *huge)
  assert code == 2 and out.splitlines()[-1] == "does NOT fit"


def test_unknown_slice_and_missing_slice_are_one_line(run_cli):
  code, _, err = run_cli("compile", "--config", TINY, "--topology", "v5e-7")
  assert code == 2 and len(err.splitlines()) == 1
  assert "unknown TPU slice 'v5e-7'" in err and "v5e-8" in err and "v5p-128" in err
  code, _, err = run_cli("compile", "--config", TINY, "mesh.slice=null")
  assert code == 2 and "pass --topology (e.g. v5e-8) or set mesh.slice" in err
  with pytest.raises(ConfigError, match="mesh.slice=v9-8: unknown TPU slice"):
    load_config(TINY, ["mesh.slice=v9-8"])


def test_without_libtpu_the_command_says_how_to_install_it(run_cli, monkeypatch):
  monkeypatch.setattr(topologies, "libtpu_installed", lambda: False)
  code, _, err = run_cli("compile", "--config", TINY, "--topology", "v5e-8")
  assert code == 2 and len(err.splitlines()) == 1
  assert "pip install 'csd-jax[tpu]'" in err


# ---- pure parts: no compile ------------------------------------------------------------------

def test_slice_table():
  assert topologies.SLICES["v5e-256"].hosts == 64 and topologies.SLICES["v5e-256"].chips == 256
  assert topologies.SLICES["v5p-8"].chips == 4        # v5p counts TensorCores, two per chip
  assert topologies.SLICES["v4-8"].topology_name == "v4:2x2x1"
  assert topologies.SLICES["v6e-8"].hosts == 1 and topologies.SLICES["v6e-16"].hosts == 4


def test_collectives_are_counted_by_kind_with_their_result_bytes():
  hlo = """
  %all-reduce.1 = f32[1024,8]{1,0} all-reduce(f32[1024,8]{1,0} %p), replica_groups={}
  %ag-start = (bf16[16,4]{1,0}, bf16[128,4]{1,0}) all-gather-start(bf16[16,4]{1,0} %x)
  %ag-done = bf16[128,4]{1,0} all-gather-done(%ag-start)
  %ar.2 = (f32[2]{0}, s32[3]{0}) all-reduce(f32[2]{0} %a, s32[3]{0} %b)
  """
  assert report_lib.collectives(hlo) == {"all-gather": (1, 128 * 4 * 2),
                                         "all-reduce": (2, 1024 * 8 * 4 + 2 * 4 + 3 * 4)}


def test_absent_tpu_means_the_cpu_backend(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(platforms.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  monkeypatch.setattr(platforms, "tpu_chips_present", lambda: False)
  platforms.skip_absent_tpu()
  assert platforms.os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")   # the user's choice wins
  platforms.skip_absent_tpu()
  assert platforms.os.environ["JAX_PLATFORMS"] == "tpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(platforms, "tpu_chips_present", lambda: True)
  platforms.skip_absent_tpu()
  assert "JAX_PLATFORMS" not in platforms.os.environ


def test_fit_table_bench_compiles_a_config_for_its_slice(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run([sys.executable, "bench/tpu_fit.py", "--only", "tiny", "--out",
                         str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(root)})
  assert done.returncode == 0, done.stderr[-2000:]
  row = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
  assert row and "| v5e-8 |" in row[0] and "| yes |" in row[0], done.stdout
  assert (tmp_path / "tiny" / "report.json").exists()
