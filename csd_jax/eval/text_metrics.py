"""Text metrics of generated answers: ROUGE-L as the MiniLLM evaluation computes it, Self-BLEU.

- `rouge_l(predictions, references)`: the `rouge-score` package's ROUGE-L F-measure with
  Porter stemming and its default tokenizer (lower-case, alphanumeric tokens), the maximum over
  each example's references, averaged and x100: the MiniLLM / S-NI `compute_metrics` recipe.
- `self_bleu(samples)`: mean BLEU-4 of each sample against the others (smoothed, NLTK);
  lower means more diverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Mean ROUGE-L F-measure x 100; each reference may be a string or a list of strings."""
  from rouge_score import rouge_scorer

  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not predictions:
    raise ValueError("no predictions to score")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  scores = []
  for prediction, refs in zip(predictions, references):
    refs = [refs] if isinstance(refs, str) else list(refs)
    scores.append(max(scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure
                      for r in refs))
  return 100.0 * float(np.mean(scores))


def self_bleu(samples: Sequence[str], max_order: int = 4) -> float:
  """Mean BLEU (x100) of every sample against all the others; needs two samples or more."""
  from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

  if len(samples) < 2:
    raise ValueError("Self-BLEU needs at least two samples")
  tokens = [s.lower().split() for s in samples]
  weights = (1.0 / max_order,) * max_order
  smoothing = SmoothingFunction().method1
  scores = [sentence_bleu(tokens[:i] + tokens[i + 1:], hypothesis, weights=weights,
                          smoothing_function=smoothing)
            for i, hypothesis in enumerate(tokens)]
  return 100.0 * float(np.mean(scores))
