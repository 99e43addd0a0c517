"""The data report at the start of a run: one info line with the records whose prompt or
response was cut and those with an empty response, and one warning that names the config key
to raise when more than a tenth was cut (or any response is empty)."""

import json
import logging

import pytest

from csd_jax.data import tfds_builder
from csd_jax.data.instruct import InstructionTokenizer, TokenizeStats
from csd_jax.data.loader import BatchLoader, LoaderConfig

SHORT = {"instruction": "Say hi.", "response": "hi"}
LONG_PROMPT = {"instruction": "word " * 40, "response": "ok"}      # > 12 prompt tokens
LONG_RESPONSE = {"instruction": "Count.", "response": "one " * 60}  # > 32 tokens in all


def _report(records, tokenizer, caplog, tmp_path=None):
  """(info lines, warning lines) of logger csd_jax.data while a loader starts on `records` (a
  JSONL file through the TFDS builder, as training reads it, when `tmp_path` is given)."""
  source = records
  if tmp_path is not None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    source = tfds_builder.instruction_files({"train": [path]}, tmp_path / "tfds")["train"]
  encode = InstructionTokenizer(tokenizer, template="none", max_length=32, max_prompt_length=12)
  caplog.clear()
  caplog.set_level(logging.INFO, logger="csd_jax.data")
  BatchLoader(source, encode, pad_id=encode.pad_id, process_index=0, process_count=1,
              config=LoaderConfig(global_batch_size=2, max_length=32))
  lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "csd_jax.data"]
  return ([m for level, m in lines if level == logging.INFO],
          [m for level, m in lines if level == logging.WARNING])


def test_cut_and_empty_records_are_counted_in_one_line(gpt2_tokenizer, caplog, tmp_path):
  records = [SHORT] * 6 + [LONG_PROMPT, LONG_RESPONSE, dict(SHORT, response=""),
                           dict(SHORT, response="  ")]
  info, warnings = _report(records, gpt2_tokenizer, caplog, tmp_path)
  assert info == ["instruction_files[train]: 10 records: 10 kept, 1 prompts cut to "
                  "max_prompt_length, 1 responses cut from the right, 0 dropped with no response "
                  "token, 2 with an empty response"]
  # A tenth cut is within bounds: only the empty responses are worth a warning.
  assert warnings == ["instruction_files[train]: 2 of 10 (20%) records have an empty response "
                      "(the student learns to stop at once): remove them from the data"]


def test_many_cut_records_warn_with_the_key_to_raise(gpt2_tokenizer, caplog):
  records = [SHORT] * 3 + [LONG_PROMPT] * 4 + [LONG_RESPONSE] * 3
  info, warnings = _report(records, gpt2_tokenizer, caplog)
  assert len(info) == 1 and "4 prompts cut" in info[0] and "3 responses cut" in info[0]
  assert warnings == [
      "data: 4 of 10 (40%) prompts cut to 12 tokens: raise data.max_prompt_length (and "
      "data.max_length with it); 3 of 10 (30%) responses cut to fit 32 tokens: raise "
      "data.max_length"]


def test_clean_data_gets_no_warning(gpt2_tokenizer, caplog):
  info, warnings = _report([SHORT] * 9 + [LONG_PROMPT], gpt2_tokenizer, caplog)
  assert len(info) == 1 and warnings == []


@pytest.mark.parametrize("stats,expected", [
    (TokenizeStats(samples=0), None),
    (TokenizeStats(samples=10, prompts_truncated=1, responses_truncated=1), None),
    (TokenizeStats(samples=10, prompts_truncated=2), "raise data.max_prompt_length"),
    (TokenizeStats(samples=10, responses_truncated=2), "raise data.max_length"),
    (TokenizeStats(samples=10, dropped_no_response=1), "1 of 10 (10%) records have an empty"),
])
def test_the_warning_threshold(stats, expected):
  warning = stats.warning(max_prompt_length=12, max_length=32)
  assert warning is None if expected is None else expected in warning
