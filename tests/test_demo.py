"""The embedded demo, in a reduced size: teacher data, layer-dropped student, CSD, the table."""

import json

import numpy as np

from csd_jax import demo
from csd_jax.models import load_pretrained
from csd_jax.models.io.layer_drop import layer_dropped_copy


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


def test_reduced_demo_lowers_the_held_out_csd(tmp_path, capsys):
  results = demo.run(tmp_path, steps=12, num_prompts=40, num_eval=8, max_new_tokens=16,
                     overrides=["train.log_every=4"])
  assert results["after"]["csd"] < results["before"]["csd"]
  assert results["after"]["fkl"] < results["before"]["fkl"]
  out = capsys.readouterr().out
  assert "ROUGE-L" in out and out.count("\nbefore") == 1 and out.count("\nafter") == 1
  answers = (tmp_path / "data" / "teacher_answers.jsonl").read_text().splitlines()
  assert len(answers) == 40 and all(json.loads(a)["response"] for a in answers)
