"""ROUGE-L and Self-BLEU against hand-made pairs and the packages they rest on."""

import pytest
from rouge_score import rouge_scorer

from csd_jax.eval.text_metrics import rouge_l, self_bleu


def test_rouge_l_equals_rouge_score_on_hand_made_pairs():
  pairs = [("The cat sat on the mat.", "A cat was sitting on the mat"),
           ("Paris is the capital of France", "The capital of France is Paris."),
           ("Running quickly", "runs quick"), ("", "something"), ("Same text", "same text")]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
  assert rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(
      100 * sum(expected) / len(expected))
  # By hand: LCS("the cat sat on the mat", "a cat was sit on the mat") = cat, on, the, mat
  # (stemmed 'sitting' -> 'sit' is not 'sat'): P = 4/6, R = 4/7, F = 2PR/(P+R) = 8/13.
  assert rouge_l([pairs[0][0]], [pairs[0][1]]) == pytest.approx(100 * 8 / 13)
  assert rouge_l(["Same text"], ["same text"]) == 100.0


def test_rouge_l_takes_the_best_of_several_references():
  assert rouge_l(["blue sky"], [["green grass", "blue sky today"]]) == pytest.approx(
      100 * 2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))


def test_self_bleu_is_high_for_copies_and_low_for_different_texts():
  same = self_bleu(["the quick brown fox jumps"] * 3)
  different = self_bleu(["the quick brown fox jumps", "a lazy dog sleeps all day",
                         "rain falls on green hills"])
  assert same == pytest.approx(100.0)
  assert different < 10.0


def test_metric_errors():
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    rouge_l(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="at least two"):
    self_bleu(["only one"])
