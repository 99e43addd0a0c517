"""`csd-jax eval --task`: the speculative_kd files read, the metrics equal rouge-score's and
sacrebleu's computed directly, answers cut at the stop strings, and a GSM8K run end to end on a
tiny random model (the results JSON and the table)."""

import json
import pathlib
import sys

import pytest

from csd_jax.errors import UserError
from csd_jax.eval.generation import format_table
from csd_jax.eval.tasks import get_task, gsm8k, summarization, translation
from csd_jax.eval.tasks.runner import answer_decoder, cut_at_stop_strings, text_stop_ids

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "speculative_kd"
# Hand-written outputs to score against the fixtures' references.
SUMMARIES = ["#Person1# books a table for two at seven.",
             "The report is late because Mary has the sales figures.",
             "#Person2# hiked in the mountains while #Person1# stayed home."]
TRANSLATIONS = ["I eat rice.", "Today the weather is good.", "She reads books."]


def test_gsm8k_reads_the_question_and_the_instruction_layouts():
  test = gsm8k.read(FIXTURES / "gsm8k_test.jsonl")
  assert [e.references[0] for e in test] == ["12", "14", "150", "1,000", "-3"]
  assert test[0].record["instruction"].startswith("Q: A baker makes 24 muffins")
  assert test[0].record["instruction"].endswith("are left? \n\nA:")
  vali = gsm8k.read(FIXTURES / "gsm8k_vali.json")           # {"instances": [...]}
  assert [e.record for e in vali] == [e.record for e in test[:3]]
  train = gsm8k.read(FIXTURES / "gsm_1k_train.json", limit=2)   # instruction used as it is
  assert [e.record for e in train] == [e.record for e in test[:2]]


def test_gsm8k_refuses_a_reference_without_its_mark(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "How many?", "answer": "Seven."}) + "\n")
  with pytest.raises(UserError, match="bad.jsonl:1: the reference solution has no '####'"):
    gsm8k.read(bad)


def test_summarization_and_translation_read_their_layouts():
  for name in ("dialogsum_test.jsonl", "summ_1k_train.json"):
    examples = summarization.read(FIXTURES / name)
    assert examples[0].record["instruction"].startswith("#Person1#: Hi, I'd like to book")
    assert examples[0].references == ("#Person1# books a table for two at seven tonight.",)
  examples = translation.read(FIXTURES / "mt_test.json")
  assert [e.source for e in examples] == ["মই ভাত খাওঁ।", "আজি বতৰ ভাল।", "তেওঁ কিতাপ পঢ়ে।"]
  assert examples[0].references == ("I eat rice.",)
  assert translation.source_sentence({"src": "x"}, "anything") == "x"
  assert get_task("mt") is translation and get_task("summ") is summarization
  with pytest.raises(UserError, match="--task 'qa': valid: gsm8k, summarization, translation"):
    get_task("qa")


def test_rouge_equals_rouge_score_on_the_fixture():
  from rouge_score import rouge_scorer

  references = [e.references for e in summarization.read(FIXTURES / "dialogsum_test.jsonl")]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
  direct = [scorer.score(refs[0], prediction) for prediction, refs in zip(SUMMARIES, references)]
  ours = summarization.rouge_scores(SUMMARIES, references)
  for name in ("rouge1", "rouge2", "rougeL"):
    expected = 100 * sum(s[name].fmeasure for s in direct) / len(direct)
    assert ours[name] == pytest.approx(expected, abs=1e-9)
  # several references: each ROUGE type takes the best one
  best = summarization.rouge_scores(["a b c"], [["a b c", "x y"]])
  assert best == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}


def test_bleu_and_chrf_equal_sacrebleu_on_the_fixture():
  import sacrebleu

  references = [e.references for e in translation.read(FIXTURES / "mt_test.json")]
  ours = translation.bleu_chrf(TRANSLATIONS, references)
  streams = [[refs[0] for refs in references]]
  assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(TRANSLATIONS, streams).score)
  assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(TRANSLATIONS, streams).score)
  assert "tok:13a" in ours["bleu_signature"] and "nrefs:1" in ours["bleu_signature"]
  two = [("I eat rice.", "Rice is what I eat.")] * 3
  assert translation.bleu_chrf(TRANSLATIONS, two)["bleu"] == pytest.approx(
      sacrebleu.corpus_bleu(TRANSLATIONS, [[a for a, _ in two], [b for _, b in two]]).score)
  with pytest.raises(UserError, match="as many for every example"):
    translation.bleu_chrf(TRANSLATIONS[:2], [("a",), ("b", "c")])


def test_comet_is_not_computed_without_its_model(tmp_path, monkeypatch):
  examples = translation.read(FIXTURES / "mt_test.json")
  scored = translation.score(examples, ["p"] * 3, TRANSLATIONS)
  assert scored["comet"] == "not computed"
  assert scored["records"][0] == {"prompt": "p", "output": "I eat rice.",
                                  "references": ["I eat rice."], "source": "মই ভাত খাওঁ।"}
  with pytest.raises(UserError, match="--comet-model nowhere.ckpt: no such file"):
    translation.check_comet_model("nowhere.ckpt")
  checkpoint = tmp_path / "model.ckpt"
  checkpoint.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "comet", None)   # the package is not installed
  with pytest.raises(UserError, match="pip install unbabel-comet"):
    translation.check_comet_model(checkpoint)
  table = format_table({"mt": scored}, translation.COLUMNS)
  assert len({len(line) for line in table.splitlines()}) == 1 and "not computed" in table


def test_answers_end_at_end_ids_and_are_cut_at_stop_strings(gpt2_tokenizer):
  encode = lambda text: gpt2_tokenizer(text)["input_ids"]  # noqa: E731
  eos = gpt2_tokenizer.eos_token_id
  texts = text_stop_ids(gpt2_tokenizer, ["\n\n"])
  assert encode("\n\n")[0] in texts and encode("\n")[0] not in texts
  decode = answer_decoder(gpt2_tokenizer, [eos], texts, ["\n\n"])
  import numpy as np

  assert decode(np.array(encode("#### 12\n\nQ: next") + [eos])) == "#### 12"
  assert decode(np.array(encode("#### 12") + [eos] + encode("\n\nmore"))) == "#### 12"
  assert decode(np.array(encode("a\n") + encode("\nb"))) == "a"   # a blank line over two tokens
  assert cut_at_stop_strings("summary\nuser: hi", ["\nuser", "\n"]) == "summary"
  assert cut_at_stop_strings("no stop", ["\n"]) == "no stop"


def test_cli_gsm8k_writes_the_json_and_the_table(tiny_model_dir, tmp_path, capsys):
  from csd_jax import cli

  out = tmp_path / "gsm.json"
  data = f"gsm={FIXTURES / 'gsm8k_test.jsonl'}"
  code = cli.main(["eval", "--task", "gsm8k", "--model", str(tiny_model_dir), "--data", data,
                   "--max-new-tokens", "6", "--batch-size", "8", "--out", str(out)])   # one compile
  printed = capsys.readouterr().out
  assert code == 0
  header, row = printed.splitlines()[:2]
  assert header.split() == ["dataset", "accuracy"] and row.split()[0] == "gsm"
  result = json.loads(out.read_text())["gsm"]
  assert (result["task"], result["examples"], result["max_new_tokens"]) == ("gsm8k", 5, 6)
  assert result["stop_strings"] == ["\n\n"] and result["sampling"]["temperature"] == 0.0
  records = result["records"]
  assert [r["reference"] for r in records] == ["12", "14", "150", "1,000", "-3"]
  assert all("Q: " in r["prompt"] and r["prompt"].count("\n\nA:") == 1 for r in records)
  for r in records:
    assert r["answer"] == gsm8k.extract_answer(r["output"])
    assert r["correct"] == gsm8k.is_correct(r["answer"], r["reference"])
  assert result["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in records) / 5)
  assert float(row.split()[1]) == pytest.approx(result["accuracy"], abs=1e-3)
  # flags that do not apply to a task are refused in one line, before any model is loaded
  assert cli.main(["eval", "--task", "gsm8k", "--model", "nowhere", "--data", data,
                   "--seeds", "10"]) == 2
  assert cli.main(["eval", "--task", "gsm8k", "--model", "nowhere", "--data", data,
                   "--comet-model", "x.ckpt"]) == 2
  errors = capsys.readouterr().err
  assert "--seeds does not apply to --task" in errors and "use it with --task translation" in errors
