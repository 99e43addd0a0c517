"""The embedded demos, in a reduced size: teacher data, layer-dropped student, CSD, the table.

The two reduced demo runs each take several GB (Gemma 3: about 11 GB): they run on one xdist
worker one after the other, and a file lock keeps them apart under any other scheduling.
"""

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from csd_jax.demo import command as demo
from csd_jax.models import load_pretrained
from csd_jax.models.io.layer_drop import layer_dropped_copy
from cpu_devices import xla_flags


# One xdist worker runs both demos, one after the other (`make test`: --dist loadgroup), while
# the other takes the rest of the suite; the lock still keeps them apart under other schedulers.
DEMO_GROUP = pytest.mark.xdist_group("demo")


@pytest.fixture
def one_demo_at_a_time(pytestconfig):
  """Hold a lock shared by every pytest worker of this checkout while a demo runs."""
  with open(pytestconfig.cache.mkdir("csd_jax_locks") / "demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def test_prompt_generator_is_seeded_and_unique():
  prompts = demo.instruction_prompts(seed=0)
  assert len(prompts) == len(set(prompts)) == len(demo.TEMPLATES) * len(demo.TOPICS)
  assert prompts == demo.instruction_prompts(seed=0) != demo.instruction_prompts(seed=1)


def test_layer_dropped_student_keeps_the_chosen_layers(converted, tmp_path):
  student = layer_dropped_copy(converted, tmp_path / "s", [0, 29])
  config = json.loads((student / "config.json").read_text())
  assert config["num_hidden_layers"] == 2
  small, big = load_pretrained(student), load_pretrained(converted)
  np.testing.assert_array_equal(np.asarray(small.layers[1].mlp.up.kernel[...]),
                                np.asarray(big.layers[29].mlp.up.kernel[...]))
  assert (student / "tokenizer.json").exists()


def test_layer_dropped_gemma3_keeps_the_kept_layers_types(tmp_path):
  """Gemma 2/3 list which layers slide: the student keeps its own layers' entries."""
  from hf_tiny import make_checkpoint

  make_checkpoint("gemma3_text", tmp_path / "t")  # sliding, full, sliding, sliding
  student = load_pretrained(layer_dropped_copy(tmp_path / "t", tmp_path / "s", [1, 3]))
  assert student.cfg.layer_types == ("full_attention", "sliding_attention")


def _demo_on_one_device(workdir, **kwargs) -> tuple[dict, str]:
  """`demo.run(workdir, **kwargs)` in a subprocess on ONE CPU device, as `csd-jax demo` runs:
  under this suite's 8 fake devices the run replicates teacher, student and optimizer state per
  device (the SmolLM2 demo took 14.6 GB and 6x the time). Its results and its stdout."""
  args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  code = ("from csd_jax.demo import command as demo; import json; "
          f"print(json.dumps(demo.run({str(workdir)!r}, {args})))")
  # XLA's default optimisation, not the suite's -O0: the demos run more than they compile
  # (the Gemma 3 one, idle machine: 187 s at -O0, 141 s at the default).
  env = {**os.environ, "XLA_FLAGS": xla_flags(1, fast_compile=False)}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


@pytest.mark.slow
@DEMO_GROUP
def test_reduced_demo_lowers_the_held_out_csd(tmp_path, converted, one_demo_at_a_time):
  results, out = _demo_on_one_device(tmp_path, steps=12, num_prompts=40, num_eval=8,
                                     max_new_tokens=16, assets=str(converted.parent),
                                     overrides=["train.log_every=4"])
  assert results["after"]["csd"] < results["before"]["csd"]
  assert results["after"]["fkl"] < results["before"]["fkl"]
  assert "ROUGE-L" in out and out.count("\nbefore") == 1 and out.count("\nafter") == 1
  answers = (tmp_path / "data" / "teacher_answers.jsonl").read_text().splitlines()
  assert len(answers) == 40 and all(json.loads(a)["response"] for a in answers)


@pytest.mark.slow
@DEMO_GROUP
def test_reduced_gemma3_demo_brings_the_student_to_the_teacher(tmp_path, gemma3_dir,
                                                                one_demo_at_a_time):
  """262k vocabulary through the fused loss; the student keeps sliding and global layers.

  The Gemma demo trains teacher-weighted CSD (configs/demo_gemma3.yaml: student-weighted CSD
  lets this student collapse onto one token, which zeroes that loss), while the table's CSD
  column is the student-weighted one: the held-out forward KL is what must fall."""
  results, out = _demo_on_one_device(
      tmp_path, teacher="gemma3-270m", steps=4, num_prompts=12, num_eval=4, max_new_tokens=8,
      assets=str(gemma3_dir.parent), overrides=["train.log_every=2", "train.heldout_every=0"])
  assert results["after"]["fkl"] < results["before"]["fkl"]
  student = json.loads((tmp_path / "assets" / "student_init" / "config.json").read_text())
  assert student["num_hidden_layers"] == 6
  assert student["layer_types"].count("full_attention") == 3
  assert "\nbefore" in out
