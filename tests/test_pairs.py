"""Chat pairs (general chat distillation): the official reformat.py's file, the two rows of a pair
(labels on the responses only, kept together in a batch), the pair objective ((2 - beta) x the
teacher-response KD + beta x the student-response KD, token means per sequence, averaged over
pairs), the gradual beta, and a tiny pairs run that learns."""

import json
import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csd_jax.config import ConfigError, load_config
from csd_jax.data.pairs import PAIR_STUDENT, PAIR_TEACHER, PairTokenizer, pair_record
from csd_jax.errors import UserError
from csd_jax.losses import logit_loss, pair_beta, per_token_loss, reduce
from csd_jax.models import init_random
from csd_jax.train.step import Objective, _count_kwargs, distill_loss, split_micro_batches

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "fixtures" / "ultrachat_pairs" / "train.json"
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def qwen_tokenizer():
  from chat_tokenizers import chat_tokenizer

  return chat_tokenizer("qwen2.5")


def _records():
  return [pair_record(r) for r in json.loads(PAIRS.read_text())]


# ---- the data ---------------------------------------------------------------------------------

def test_the_fixture_is_in_reformat_py_format():
  rows = json.loads(PAIRS.read_text())   # one JSON list, as reformat.py's json.dump writes it
  assert len(rows) >= 8
  for row in rows:
    assert list(row) == ["prompt", "chosen", "rejected"]
    for side in ("chosen", "rejected"):
      assert [m["role"] for m in row[side]] == ["user", "assistant"]
      assert row[side][0] == {"content": row["prompt"], "role": "user"}


def test_the_data_and_the_loss_agree_on_the_roles():
  assert (PAIR_TEACHER, PAIR_STUDENT) == (reduce.PAIR_TEACHER, reduce.PAIR_STUDENT)


def test_pair_records_in_every_form():
  row = json.loads(PAIRS.read_text())[0]
  official = pair_record(row)
  assert json.loads(official["messages"]) == [{"role": "user", "content": row["prompt"]}]
  assert official["teacher"] == row["chosen"][1]["content"]
  assert official["student"] == row["rejected"][1]["content"]
  texts = {"prompt": row["prompt"], "teacher": official["teacher"],
           "student": official["student"]}
  assert pair_record(texts) == official
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  loose = pair_record({"messages": messages, "chosen": "Hello.", "rejected": "Hey"})
  assert json.loads(loose["messages"]) == messages


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "a"}, "a pair needs chosen/teacher"),
    ({"chosen": "a", "rejected": "b"}, "needs 'prompt' (text) or 'messages'"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}],
      "rejected": "b"}, "must end with the assistant's response"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "differ before their answers"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "neither a string nor a list of messages"),
])
def test_bad_pair_records_are_one_line_errors(row, message):
  with pytest.raises(UserError, match=re.escape(message)) as error:
    pair_record(row)
  assert "\n" not in str(error.value)


def test_two_rows_a_pair_with_labels_on_the_responses_only(qwen_tokenizer):
  encode = PairTokenizer(qwen_tokenizer, max_length=512, max_prompt_length=256)
  for record in _records():
    teacher, student = encode(record)
    assert teacher["pair_role"].tolist() == [PAIR_TEACHER] * len(teacher["input_ids"])
    assert student["pair_role"].tolist() == [PAIR_STUDENT] * len(student["input_ids"])
    for example, response in ((teacher, record["teacher"]), (student, record["student"])):
      labels = example["labels"]
      answered = labels != -100
      first = int(np.argmax(answered))   # the labels are one block: the response
      assert answered[first:].all() and not answered[:first].any()
      assert qwen_tokenizer.decode(labels[answered]) == response + "<|im_end|>"
      prompt = qwen_tokenizer.decode(example["input_ids"][:first + 1])
      assert prompt.endswith("<|im_start|>assistant\n")   # the generation prompt, not learned
    # both rows hold the same prompt
    np.testing.assert_array_equal(teacher["input_ids"][:first], student["input_ids"][:first])


def test_lengths_are_cut_as_the_official_tokenize_row(qwen_tokenizer):
  record = pair_record({"prompt": "x" * 300, "teacher": "t" * 200, "student": "s" * 20})
  fits = PairTokenizer(qwen_tokenizer, max_length=1024, max_prompt_length=100)
  teacher, _ = fits(record)
  assert fits.stats.prompts_truncated == 0   # it all fits: the prompt is kept whole
  whole_prompt = int(np.argmax(teacher["labels"] != -100)) + 1
  cut = PairTokenizer(qwen_tokenizer, max_length=400, max_prompt_length=100)
  teacher, student = cut(record)
  for example, response in ((teacher, 200 + 1), (student, 20 + 1)):   # + <|im_end|>
    labels = example["labels"]
    prompt = int(np.argmax(labels != -100)) + 1
    assert prompt == 100   # prompt + the longer response > 400: the prompt keeps its last 100
    assert len(example["input_ids"]) + 1 == prompt + response   # the responses fit: whole
    np.testing.assert_array_equal(example["input_ids"][:prompt],
                                  fits(record)[0]["input_ids"][whole_prompt - 100:whole_prompt])
  tight = PairTokenizer(qwen_tokenizer, max_length=250, max_prompt_length=100)
  teacher, student = tight(record)
  assert (teacher["labels"] != -100).sum() == 150   # responses cut to 250 - 100 tokens
  assert (student["labels"] != -100).sum() == 21
  assert (tight.stats.prompts_truncated, tight.stats.responses_truncated) == (1, 1)


def test_pairs_stay_whole_in_batches_of_every_process(qwen_tokenizer, tmp_path):
  from csd_jax.data import tfds_builder
  from csd_jax.data.loader import BatchLoader, LoaderConfig

  source = tfds_builder.pair_files({"train": [PAIRS]}, tmp_path)["train"]   # TFDS, ArrayRecord
  encode = PairTokenizer(qwen_tokenizer, max_length=512, max_prompt_length=256)
  config = LoaderConfig(global_batch_size=8, max_length=512, seed=3)
  loaders = [BatchLoader(source, encode, pad_id=encode.pad_id, config=config, process_index=i,
                         process_count=2) for i in range(2)]
  assert loaders[0].steps_per_epoch == 16 * 2 // 8
  seen = []
  for _ in range(5):   # past an epoch: 16 pairs, 2 per process and batch
    for loader in loaders:
      batch = next(loader)
      roles = batch["pair_role"][:, 0]
      assert roles.tolist() == [PAIR_TEACHER, PAIR_STUDENT] * 2
      for row in (0, 2):
        first = int(np.argmax(batch["labels"][row] != -100))
        np.testing.assert_array_equal(batch["input_ids"][row, :first + 1],
                                      batch["input_ids"][row + 1, :first + 1])
        assert (batch["pair_role"][row] == PAIR_TEACHER).sum() == batch["attention_mask"][row].sum()
        seen.append(qwen_tokenizer.decode(batch["input_ids"][row, :first + 1]))
  assert len(set(seen[:16])) == 16   # one epoch: every pair once, over both processes
  state = loaders[0].get_state()
  expected = next(loaders[0])
  loaders[0].set_state(state)
  for key, value in next(loaders[0]).items():
    np.testing.assert_array_equal(value, expected[key])
  with pytest.raises(UserError, match="not whole records of 2 rows"):
    BatchLoader(source, encode, pad_id=0, process_index=0, process_count=2,
                config=LoaderConfig(global_batch_size=6, max_length=512))


# ---- the objective ----------------------------------------------------------------------------

def _pair_batch(seed=0, rows=4, length=12, vocab=96):
  """Rows (teacher, student) of 2 pairs, with responses of different lengths; row 3 mostly
  padding."""
  ids = jax.random.randint(jax.random.key(seed), (rows, length + 1), 0, vocab)
  labels = np.asarray(ids[:, 1:]).copy()
  starts, ends = [3, 5, 2, 4], [12, 9, 11, 6]
  attention = np.zeros((rows, length), np.int32)
  for r, (s, e) in enumerate(zip(starts, ends)):
    labels[r, :s] = labels[r, e:] = -100
    attention[r, :e] = 1
  role = np.repeat(np.array([PAIR_TEACHER, PAIR_STUDENT] * (rows // 2))[:, None], length, 1)
  return {"input_ids": ids[:, :-1], "labels": jnp.asarray(labels),
          "attention_mask": jnp.asarray(attention), "pair_role": jnp.asarray(role, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


def _expected(values, labels, beta):
  """(2 - beta) x teacher-row mean + beta x student-row mean, over pairs (float64)."""
  values, valid = np.asarray(values, np.float64), np.asarray(labels) != -100
  means = [values[r][valid[r]].mean() for r in range(len(values))]
  pairs = [(2 - beta) * means[r] + beta * means[r + 1] for r in range(0, len(means), 2)]
  return float(np.mean(pairs))


@pytest.mark.parametrize("name", ["csd", "fkl", "jsd"])
@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_the_pair_objective_is_the_weighted_per_sequence_losses(name, beta):
  z = jax.random.normal(jax.random.key(1), (4, 12, 50)) * 3
  t = jax.random.normal(jax.random.key(2), (4, 12, 50)) * 3
  batch = _pair_batch()
  valid = batch["labels"] != -100
  got = logit_loss(name, z, t, valid, normalize="sequence",
                   row_weights=reduce.pair_row_weights(batch["pair_role"], beta),
                   num_sequences=reduce.num_pairs(batch["pair_role"], valid))
  want = _expected(per_token_loss(name, z, t), batch["labels"], beta)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


MODEL = dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=96)


@pytest.fixture(scope="module")
def models():
  return init_random(MODEL, seed=0), init_random(MODEL, seed=1)


@pytest.mark.parametrize("fused", [True, False])
def test_the_step_loss_on_pairs_fused_or_not_whole_or_in_micro_batches(fused, models):
  student, teacher = models
  batch, beta = _pair_batch(), 1.3
  objective = Objective("csd", {}, ce_coef=0.5, fused=fused, chunk_size=8, normalize="sequence")
  counts = _count_kwargs(batch, "sequence")
  assert float(counts["num_sequences"]) == 2   # pairs, not rows
  graphdef, params = nnx.split(student)

  def loss(params, batch):
    return distill_loss(nnx.merge(graphdef, params), teacher, batch, objective, counts,
                        pair_beta=beta)

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (total, parts), grads = value_and_grad(params, batch)
  z, t = (jax.jit(lambda b, m=model: m.logits(m.hidden_states(
      b["input_ids"], b["attention_mask"], b["positions"])[0]))(batch)
          for model in (student, teacher))
  np.testing.assert_allclose(float(parts["kd"]),
                             _expected(per_token_loss("csd", z, t), batch["labels"], beta),
                             rtol=1e-5)
  ce = np.asarray(per_token_loss("ce", z, batch["labels"]), np.float64)
  valid = np.asarray(batch["labels"]) != -100
  teacher_ce = np.mean([ce[r][valid[r]].mean() for r in (0, 2)])   # the official seqkd
  np.testing.assert_allclose(float(parts["ce"]), teacher_ce, rtol=1e-5)
  # grad accumulation: micro-batch a holds rows a, a + 2, so every pair is split in two
  pieces = [value_and_grad(params, {k: v[a] for k, v in micro.items()})
            for micro in [split_micro_batches(batch, 2)] for a in range(2)]
  np.testing.assert_allclose(sum(float(p[0][0]) for p in pieces), float(total), rtol=1e-5)
  summed = jax.tree.map(lambda a, b: a + b, pieces[0][1], pieces[1][1])
  for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_the_gradual_beta_is_the_official_schedule():
  for total in (7, 10, 389):
    official = [1.0 + 0.5 * min(1.0, 2 * step / total) for step in range(total)]
    ours = [float(pair_beta(step, start=1.0, end=1.5, ramp=0.5, total_steps=total))
            for step in range(total)]
    np.testing.assert_allclose(ours, official, rtol=1e-6)
  assert float(pair_beta(123, start=1.0, end=None, total_steps=200)) == 1.0
  ramp = [float(pair_beta(s, start=1.0, end=0.5, ramp=1.0, total_steps=4)) for s in range(5)]
  np.testing.assert_allclose(ramp, [1.0, 0.875, 0.75, 0.625, 0.5])


# ---- the config and a run ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["loss.normalize=token"], "set loss.normalize=sequence"),
    (["train.batch_size=7", "train.grad_accum=1"], "use an even number of rows"),
    (["data.pack=true"], "set data.pack=false"),
    (["loss.pair_beta_end=2.5"], "loss.pair_beta_end=2.5: must be within 0..2"),
    (["loss.pair_beta_ramp=0"], "must be in (0, 1]"),
    (["data.source=files"], "need data.source=pairs"),
    (["optim.warmup_steps=3"], "set one of them"),
])
def test_pair_config_errors(overrides, message):
  base = ["data.source=pairs", f"data.train_files=[{PAIRS}]", "loss.normalize=sequence",
          "loss.pair_beta_end=1.5", "optim.warmup_ratio=0.1"]
  load_config(TINY, base)
  with pytest.raises(ConfigError, match=re.escape(message)):
    load_config(TINY, base + overrides)


def test_the_official_config():
  config = load_config(ROOT / "configs" / "qwen2.5_7b_to_1.5b_ultrachat_csd.yaml")
  assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (16, 128, 0.05)
  assert set(config.lora.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
  assert (config.optim.lr, config.optim.schedule, config.optim.warmup_ratio) == (5e-5, "cosine",
                                                                                 0.1)
  assert (config.data.max_length, config.data.max_prompt_length, config.train.epochs) == (
      1024, 512, 1)
  assert config.train.batch_size == 2 * 128   # 128 pairs a step
  assert (config.loss.pair_beta, config.loss.pair_beta_end, config.loss.normalize) == (
      1.0, None, "sequence")
  from csd_jax.run.state import learning_rate_schedule

  schedule = learning_rate_schedule(config.optim, 389)   # 49.8k pairs / 128: ceil(38.9) warm-up
  assert float(schedule(39)) == pytest.approx(5e-5) and float(schedule(38)) < 5e-5


@pytest.mark.slow
def test_a_tiny_pairs_run_learns(tmp_path, qwen_tokenizer, run_cli, caplog):
  caplog.set_level(logging.INFO, logger="csd_jax")
  qwen_tokenizer.save_pretrained(tmp_path / "tokenizer")
  size = ["teacher.config.vocab_size=288", "student.config.vocab_size=288",
          "teacher.config.n_positions=256", "student.config.n_positions=256"]
  steps = 24
  code, _, stderr = run_cli(
      "train", "--config", TINY, "--workdir", tmp_path / "w", "data.source=pairs",
      f"data.train_files=[{PAIRS}]", f"data.tokenizer={tmp_path / 'tokenizer'}",
      "data.template=chat", "data.max_length=256", "data.max_prompt_length=160",
      f"data.data_dir={tmp_path / 'tfds'}", "loss.normalize=sequence", "loss.pair_beta_end=1.5",
      f"train.steps={steps}", "train.batch_size=16", "train.grad_accum=2", *size,  # 8 pairs;
      cwd=ROOT)                                                                 # 8 rows a device
  assert code == 0, stderr[-3000:]
  from csd_jax.metrics import read_metrics

  rows = [row for row in read_metrics(tmp_path / "w") if "loss" in row]
  losses = [row["loss"] for row in rows]
  assert len(losses) == steps and losses[-1] < 0.5 * losses[0]
  betas = [row["pair_beta"] for row in rows]
  np.testing.assert_allclose(betas, [1 + 0.5 * min(1, 2 * s / steps) for s in range(steps)],
                             rtol=1e-6)
  assert "16 records: 16 kept" in caplog.text   # in this process: logged, not printed
  assert not math.isnan(losses[-1])


def _generate_lines(path, answers, prompts=("Say hi.", "Name a colour.")):
  with open(path, "w") as f:
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
      for sample in range(2):   # only sample 0 joins, as the official's one response a model
        f.write(json.dumps({"index": index, "sample": sample, "turn": 0, "prompt": prompt,
                            "response": f"{answer} #{sample}"}) + "\n")


def test_pairs_command_joins_generate_files_into_the_official_layout(tmp_path, capsys):
  from csd_jax.cli import main

  _generate_lines(tmp_path / "teacher.jsonl", ["Hello there!", "Blue."])
  _generate_lines(tmp_path / "student.jsonl", ["hi", "red"])
  out = tmp_path / "train.json"
  assert main(["pairs", "--teacher", str(tmp_path / "teacher.jsonl"), "--student",
               str(tmp_path / "student.jsonl"), "--out", str(out)]) == 0
  records = json.loads(out.read_text())
  assert records[1] == {
      "prompt": "Name a colour.",
      "chosen": [{"content": "Name a colour.", "role": "user"},
                 {"content": "Blue. #0", "role": "assistant"}],
      "rejected": [{"content": "Name a colour.", "role": "user"},
                   {"content": "red #0", "role": "assistant"}]}
  assert [pair_record(r)["teacher"] for r in records] == ["Hello there! #0", "Blue. #0"]
  _generate_lines(tmp_path / "short.jsonl", ["hi"], prompts=("Say hi.",))
  assert main(["pairs", "--teacher", str(tmp_path / "teacher.jsonl"), "--student",
               str(tmp_path / "short.jsonl"), "--out", str(tmp_path / "x.json")]) == 2
  assert "answer different prompts (indices [1])" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists()
