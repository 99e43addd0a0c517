"""On-policy distillation: row layout (and the official off-by-one), replay buffer, the mixing
modes (imitkd, gkd, distillm), tiny runs."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csd_jax.train import onpolicy
from csd_jax.config import ConfigError, load_config
from csd_jax.data.instruct import InstructionTokenizer
from csd_jax.data.loader import pad_batch
from csd_jax.metrics import read_metrics
from csd_jax.run.state import ROW_KEYS, empty_replay
from csd_jax.train.loop import build_trainer, train

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PAD, EOS = 0, 2
ONPOLICY = ["onpolicy.ratio=0.5", "onpolicy.buffer_size=16"]   # tiny.yaml: 8 rows a batch


def _rows(prompt_tokens, answer_tokens, *, length=8, prompt_width=4):
  """answer_rows for one prompt (left-padded here) and one sampled answer."""
  prompt = np.full((1, prompt_width), PAD, np.int32)
  prompt[0, prompt_width - len(prompt_tokens):] = prompt_tokens
  rows = onpolicy.answer_rows(jnp.asarray(prompt), jnp.asarray([len(prompt_tokens)]),
                              jnp.asarray([answer_tokens], jnp.int32), eos_ids=(EOS,),
                              pad_id=PAD, length=length)
  return {k: np.asarray(v[0]).tolist() for k, v in rows.items()}


def test_rows_align_by_hand():
  # prompt 5 6 7, sampled answer 8 9 eos, then the sampler's padding
  rows = _rows([5, 6, 7], [8, 9, EOS, PAD, PAD])
  assert rows["input_ids"] == [5, 6, 7, 8, 9, PAD, PAD, PAD]
  assert rows["labels"] == [-100, -100, 8, 9, EOS, -100, -100, -100]
  assert rows["attention_mask"] == [1, 1, 1, 1, 1, 0, 0, 0]
  assert rows["positions"] == [0, 1, 2, 3, 4, 0, 0, 0]


def test_official_sampler_is_one_position_late():
  """The official sampler (distillm/sampler.py, used by the CSD code) writes
  `no_model_batch[i, len(prompt):len(full)] = response` and the losses use `label != -100` as
  the mask over logits that predict the next token. Here is that mask for the example above."""
  prompt, answer = [5, 6, 7], [8, 9]       # it strips pad == eos (GPT-2) from the answer
  full = prompt + answer
  official = [0] * 8
  for t in range(len(prompt), len(full)):
    official[t] = 1
  ours = [int(label != -100) for label in _rows(prompt, [8, 9, EOS, PAD, PAD])["labels"]]
  assert official == [0, 0, 0, 1, 1, 0, 0, 0]
  assert ours == [0, 0, 1, 1, 1, 0, 0, 0]
  # Official position 2 (last prompt token -> first answer token 8) is never trained, and its
  # position 4 predicts what follows 9 while the input holds 9: one late. Ours trains 2, 3, 4
  # as the data rows do (4 predicts eos).


def test_no_eos_keeps_the_whole_answer_and_rows_are_cut_to_length():
  rows = _rows([5], [8, 9, 10, 11, 12, 13, 14, 15, 16], length=6)
  assert rows["input_ids"] == [5, 8, 9, 10, 11, 12]
  assert rows["labels"] == [8, 9, 10, 11, 12, 13]


def test_data_rows_round_trip(gpt2_tokenizer):
  """A dataset row's prompt plus its own response, as if sampled, gives back the row exactly:
  on-policy rows are laid out as the data's rows."""
  encode = InstructionTokenizer(gpt2_tokenizer, max_length=48, max_prompt_length=24)
  records = [{"instruction": "Name a colour.", "context": "", "response": "Blue, like the sky."},
             {"instruction": "Add two and three.", "context": "Be brief.", "response": "Five."}]
  examples = [encode(r) for r in records]
  batch = {k: jnp.asarray(v) for k, v in pad_batch(examples, pad_id=encode.pad_id,
                                                   max_length=48, bucket_multiple=48).items()}
  prompt, mask, lengths = onpolicy.batch_prompts(batch, 24, encode.pad_id)
  answers = np.full((2, 20), encode.pad_id, np.int32)
  for i, e in enumerate(examples):
    start = int(np.argmax(e["labels"] != -100))
    response = e["labels"][start:]
    answers[i, :len(response)] = response
    assert int(lengths[i]) == start + 1
    np.testing.assert_array_equal(np.asarray(prompt[i, 24 - start - 1:]),
                                  e["input_ids"][:start + 1])
    assert int(mask[i].sum()) == start + 1
  rows = onpolicy.answer_rows(prompt, lengths, jnp.asarray(answers), eos_ids=(encode.eos_id,),
                              pad_id=encode.pad_id, length=48)
  for key in ROW_KEYS:
    np.testing.assert_array_equal(np.asarray(rows[key]), np.asarray(batch[key]), err_msg=key)


def test_prompts_keep_their_end_and_rows_without_targets_are_dropped():
  batch = {"input_ids": jnp.asarray([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]),
           "labels": jnp.asarray([[-100, -100, -100, 5, 6, -100], [-100] * 6])}
  prompt, mask, lengths = onpolicy.batch_prompts(batch, 3, PAD)
  assert np.asarray(prompt).tolist() == [[2, 3, 4], [0, 0, 0]]
  assert np.asarray(mask).tolist() == [[1, 1, 1], [0, 0, 1]]   # generation needs a last token
  assert np.asarray(lengths).tolist() == [3, 0]
  rows = onpolicy.answer_rows(prompt, lengths, jnp.asarray([[9, EOS], [9, EOS]]),
                              eos_ids=(EOS,), pad_id=PAD, length=6)
  assert np.asarray(rows["labels"][1]).tolist() == [-100] * 6
  assert int(rows["attention_mask"][1].sum()) == 0


def _marked(values):
  return {k: jnp.asarray(np.repeat(np.asarray(values)[:, None], 3, 1), jnp.int32)
          for k in ROW_KEYS}


def test_replay_buffer_is_a_ring_and_draws_distinct_filled_rows():
  buffer = empty_replay(5, 3, PAD)
  buffer = onpolicy.push(buffer, _marked([1, 2, 3]))
  assert int(buffer["filled"]) == 3
  drawn = onpolicy.draw(buffer, jax.random.key(0), 3)
  assert sorted(np.asarray(drawn["input_ids"][:, 0]).tolist()) == [1, 2, 3]
  buffer = onpolicy.push(buffer, _marked([4, 5, 6]))           # 6 overwrites the oldest, 1
  assert int(buffer["filled"]) == 5 and int(buffer["cursor"]) == 1
  assert np.asarray(buffer["rows"]["input_ids"][:, 0]).tolist() == [6, 2, 3, 4, 5]
  seen = set()
  for seed in range(20):
    rows = np.asarray(onpolicy.draw(buffer, jax.random.key(seed), 4)["input_ids"][:, 0])
    assert len(set(rows.tolist())) == 4
    seen |= set(rows.tolist())
  assert seen == {2, 3, 4, 5, 6}


@pytest.mark.parametrize("count,replaced", [(0, []), (2, [3, 7]), (4, [1, 3, 5, 7]),
                                            (8, list(range(8)))])
def test_mix_rows_spreads_the_replaced_rows(count, replaced):
  batch = _marked(np.arange(8))
  mixed = onpolicy.mix_rows(batch, _marked(100 + np.arange(count)))
  got = np.asarray(mixed["input_ids"][:, 0]).tolist()
  assert [i for i, v in enumerate(got) if v >= 100] == replaced
  assert sorted(v for v in got if v >= 100) == list(100 + np.arange(count))


def _tiny(workdir, *overrides):
  config = load_config(TINY, [*ONPOLICY, "train.steps=8", *overrides])
  train(config, workdir)
  return read_metrics(workdir)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
  """The metrics of each mix's uninterrupted 8-step run, trained once a module, when a test
  first asks for it: "the loss falls" and "a resume repeats it" read the same run."""
  runs = {}

  def get(mix):
    if mix not in runs:
      runs[mix] = _tiny(tmp_path_factory.mktemp(f"whole-{mix}"), f"onpolicy.mix={mix}")
    return runs[mix]

  return get


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["imitkd", "gkd"])
def test_a_short_onpolicy_run_lowers_the_loss(whole_run, mix):
  assert load_config(TINY).train.heldout_every == 0   # the held-out loss only at the end
  rows = whole_run(mix)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.7 * losses[0], losses
  # synthetic rows have 32 targets; an answer row 24 (1 prompt token + 24 sampled)
  counts = {r["valid_tokens"] for r in rows if "valid_tokens" in r}
  assert max(counts) <= 256 and min(counts) < 256, counts


@pytest.mark.parametrize("mix", ["imitkd", "distillm"])
def test_resume_draws_the_same_rows(tmp_path, whole_run, mix):
  """Stopped after 4 steps and resumed, a run with a replay buffer repeats the uninterrupted one
  exactly: the buffer (16 rows; imitkd draws 4 a step, distillm's heads steps all 8) is part of
  the checkpoint."""
  if mix == "distillm":   # heads on both sides of the split: the resumed steps draw old rows
    coins = [_driver("onpolicy.mix=distillm").coin(step) for step in range(8)]
    assert any(coins[:4]) and any(coins[4:]), coins
  whole = whole_run(mix)
  _tiny(tmp_path / "split", f"onpolicy.mix={mix}", "train.steps=4")
  resumed = _tiny(tmp_path / "split", f"onpolicy.mix={mix}")
  by_step = {r["step"]: r["loss"] for r in whole if "loss" in r}
  assert min(r["valid_tokens"] for r in whole if "valid_tokens" in r) < 256  # answers trained
  assert any("loss" in r and r["step"] > 4 for r in resumed)
  for r in resumed:
    if "loss" in r and r["step"] > 4:
      assert r["loss"] == by_step[r["step"]], r["step"]


def test_resuming_with_another_buffer_is_refused_and_keeps_the_run(tmp_path):
  """A changed onpolicy.* no longer fits the checkpoints: a one-line error, not a silent
  fresh start over them, and the run's config.yaml stays the one its checkpoints need."""
  _tiny(tmp_path, "train.steps=2")
  with pytest.raises(ValueError, match="can be restored into this config"):
    _tiny(tmp_path, "train.steps=4", "onpolicy.buffer_size=24")
  assert load_config(tmp_path / "config.yaml").onpolicy.buffer_size == 16
  assert max(r["step"] for r in read_metrics(tmp_path)) == 2


def _driver(*overrides, seed=0):
  """A driver for its coin alone: no student (nothing is traced until a heads step runs)."""
  config = load_config(TINY, [*ONPOLICY, *overrides]).onpolicy
  return onpolicy.OnPolicy(config, student_graphdef=None, batch_size=8, max_length=32,
                           max_prompt_length=8, eos_ids=(), pad_id=0, seed=seed)


@pytest.mark.parametrize("mix", ["gkd", "distillm"])
def test_the_coin_with_a_negative_seed(mix):
  driver = _driver(f"onpolicy.mix={mix}", seed=-3)
  coins = [driver.coin(step) for step in range(64)]
  assert coins == [driver.coin(step) for step in range(64)] and 16 < sum(coins) < 48


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_the_coin_is_heads_a_share_ratio_of_the_steps(ratio):
  driver = _driver("onpolicy.mix=distillm", f"onpolicy.ratio={ratio}")
  share = np.mean([driver.coin(step) for step in range(2000)])
  assert abs(share - ratio) < 0.04, share   # 4 standard deviations at most


@pytest.fixture(scope="module")
def distillm_trainer():
  """A tiny distillm run's trainer: the student, the train state (its empty buffer) and the
  batches, for the driver at work without a train step (nothing here changes `trainer.state`)."""
  return build_trainer(load_config(TINY, [*ONPOLICY, "onpolicy.mix=distillm"]))


def _copied(state):
  """`state` with a buffer of its own: a heads step donates the one it is given."""
  return state.replace(replay=jax.tree.map(jnp.copy, state.replay))


def _row_list(rows, count=None):
  """The rows (all keys of each) as hashable tuples, the first `count` of them."""
  columns = [np.asarray(rows[k])[:count] for k in ROW_KEYS]
  return [tuple(np.concatenate([c[i] for c in columns]).tolist())
          for i in range(len(columns[0]))]


def test_distillm_tails_steps_leave_batch_and_buffer_untouched(distillm_trainer, monkeypatch):
  driver, state = distillm_trainer.onpolicy, distillm_trainer.state
  assert int(state.replay["filled"]) == 0   # initial_replay gives distillm a buffer

  def generate(*args):
    raise AssertionError("a tails step generated")
  monkeypatch.setattr(driver, "_replay", generate)
  batch = next(distillm_trainer.inputs.train)
  tails = [step for step in range(10) if not driver.coin(step)][:3]
  for step in tails:
    got_state, got_batch = driver(state, batch, step)
    assert got_state is state and got_batch is batch


def test_distillm_heads_steps_draw_the_whole_batch_from_the_buffer(distillm_trainer):
  """Official `mixed`: all the fresh answers go into the buffer, then `random.sample(buffer,
  k=bs)`: every row is a distinct buffer row, fresh answers and older ones alike."""
  driver, state = distillm_trainer.onpolicy, _copied(distillm_trainer.state)
  heads = [step for step in range(10) if driver.coin(step)][:2]
  for n, step in enumerate(heads, 1):
    batch = next(distillm_trainer.inputs.train)
    state, got = driver(state, batch, step)
    assert int(state.replay["filled"]) == 8 * n
    assert got.keys() == batch.keys() and got["input_ids"].shape == batch["input_ids"].shape
    buffer = set(_row_list(state.replay["rows"], 8 * n))
    rows = _row_list(got)
    assert len(set(rows)) == 8 and set(rows) <= buffer
    assert not set(rows) & set(_row_list(batch))   # the student's answers, not the data's
    if n == 1:   # the buffer held only this step's answers: all of them, in a random order
      assert set(rows) == buffer


def test_distillm_is_deterministic_given_state_and_step(distillm_trainer):
  driver = distillm_trainer.onpolicy
  step = next(step for step in range(10) if driver.coin(step))
  batch = next(distillm_trainer.inputs.train)
  first = driver(_copied(distillm_trainer.state), batch, step)
  again = driver(_copied(distillm_trainer.state), batch, step)
  for got, want in [(first[1], again[1]), (first[0].replay, again[0].replay)]:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def test_export_reads_an_onpolicy_checkpoint(tmp_path):
  from csd_jax.run.models import open_run

  _tiny(tmp_path, "train.steps=2")
  run = open_run(tmp_path)
  assert run.step == 2 and run.config.onpolicy.ratio == 0.5


def test_onpolicy_config_errors():
  for overrides, message in [
      (["onpolicy.ratio=1.5"], "within 0..1"),
      (["onpolicy.ratio=0.5", "onpolicy.buffer_size=4"], "at least one batch"),
      (["onpolicy.ratio=0.5", "data.pack=true"], "data.pack=false"),
      (["onpolicy.ratio=0.5", "onpolicy.max_new_tokens=99"], "within 0..24"),
      (["onpolicy.ratio=0.05"], "no row"),
      (["onpolicy.mix=ppo"], "imitkd, gkd")]:
    with pytest.raises(ConfigError, match=message):
      load_config(TINY, overrides)
