"""The GSM8K grader's verdict: is a model's answer equal to the reference, by the rules of the
official `grader.math_equal` (aailab-kaist/CSD `task_specific_distillation/eval/grader.py`, a copy
of google-research `speculative_kd/eval/grader.py`, itself from ToRA / PRM800K).

The rules, in the official order (`prediction`, `reference`: strings):
1. normalise each: a leading `$` before a number is dropped (nothing else is then done to that
   string); `12%` / `12\\%` lose the sign; `x_b` (a base) becomes int(float(x)); every `\\pi`
   becomes `*pi` after a digit, `1*pi` elsewhere, and the result is evaluated as arithmetic
   where it is arithmetic (a number then, or a tuple of numbers);
2. equal as texts, ignoring case and the surrounding whitespace, or all spaces;
3. both numbers (commas dropped, or `{,}`): equal within a relative `tolerance` to the
   reference, or to the reference x 100 or / 100 (a percentage written either way); two
   numbers never go further;
4. an empty prediction is wrong;
5. equal once brackets and braces are removed; tuples / intervals `(a, b)` and comma lists
   `a, b` compared element by element (these recursions use the default tolerance and pi);
   `Point(a, b)` against `(a, b)`;
6. otherwise the FIRST number of each (commas dropped; `[-+]?\\d*\\.?\\d+`) compared: equal, or
   within the relative tolerance. So `18 dollars` equals `18`, while `1/2` does not equal `0.5`
   (its first number is 1): fractions count only when written as the reference writes them.

Where this departs from the official code, and why:
- `\\pi` after a digit (`900\\pi`): the official loop never advances there and never ends; here
  every `\\pi` is replaced, as the loop's ToRA original does.
- the arithmetic of rule 1 is evaluated by a small evaluator of numbers, + - * / ** and
  brackets, never by Python's `eval` on model output; what it cannot read stays text.
- what makes the official script crash counts as wrong here: an answer with no number at rule 6
  (sympy raises SyntaxError there), `inf` in a base (`inf_2`), an empty reference; a first
  number with leading zeros (`007 apples`, which sympy refuses) is read as its value.
- the `\\begin{pmatrix}` branches are left out: their literal holds `\\b`, a backspace, so they
  can never match a real answer (dead code in the official grader).
- sympy is not used: at rule 6 both sides are single numbers, whose `simplify(a - b) == 0` and
  `isclose(N(a), N(b))` are float equality and `math.isclose`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

# Percent forms of rule 1 and the first-number pattern of rule 6, as the official grader has them.
_DOLLAR = re.compile(r"\$\d+(\.\d+)?")
_PERCENT = (re.compile(r"^\d+(\.\d+)?%$"), re.compile(r"^\d+(\.\d+)?\\%$"))
_FIRST_NUMBER = re.compile(r"[-+]?\d*\.?\d+")
_INTERVALS = (("Interval(", r"^Interval\((.*)\)$", "[{}]"),
              ("Interval.Ropen(", r"^Interval\.Ropen\((.*)\)$", "[{})"),
              ("Interval.Lopen(", r"^Interval\.Lopen\((.*)\)$", "({}]"),
              ("Interval.open(", r"^Interval\.open\((.*)\)$", "({})"))
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
              ast.UAdd: operator.pos}
_MAX_EXPONENT = 1000   # larger powers are not an answer's arithmetic: left as text


class _NotArithmetic(Exception):
  pass


def _arithmetic(node: ast.AST) -> Any:
  """The value of a parsed expression of numbers, + - * / ** and brackets, or a tuple / list of
  such (what Python's `eval` makes of `(\\pi, 2)` once pi is written in)."""
  if isinstance(node, ast.Expression):
    return _arithmetic(node.body)
  if isinstance(node, (ast.Tuple, ast.List)):
    values = [_arithmetic(element) for element in node.elts]
    return tuple(values) if isinstance(node, ast.Tuple) else values
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return node.value
  if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
    return _OPERATORS[type(node.op)](_arithmetic(node.operand))
  if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
    left, right = _arithmetic(node.left), _arithmetic(node.right)
    if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
      raise _NotArithmetic
    return _OPERATORS[type(node.op)](left, right)
  raise _NotArithmetic


def evaluate_arithmetic(text: str) -> Any:
  """`text`'s value if it is arithmetic on numbers (`900*3.14`: a number; `(1*3.14, 2)`: a
  tuple), else None."""
  try:
    return _arithmetic(ast.parse(text.strip(), mode="eval"))
  except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError,
          RecursionError, _NotArithmetic):
    return None


def _replace_pi(text: str, pi: float) -> str:
  """Every `\\pi` as `*pi` after a digit (`9\\pi` is 9 pi), else `1*pi`."""
  out, rest = "", text
  while (index := rest.find("\\pi")) != -1:
    before = out + rest[:index]
    out = before + (f"*{pi}" if before[-1:].isdigit() else f"1*{pi}")
    rest = rest[index + 3:]
  return out + rest


def normalize(answer: Any, pi: float = math.pi) -> Any:
  """Rule 1. Raises ValueError for a base whose digits are not a number (`x_2`)."""
  if not isinstance(answer, str):
    return answer
  if _DOLLAR.match(answer):
    return answer[1:]
  if any(pattern.match(answer) for pattern in _PERCENT):
    return answer.replace("\\%", "").replace("%", "")
  if "_" in answer:
    return int(float(answer.split("_")[0]))   # ValueError / OverflowError: the caller's
  if "\\pi" in answer:
    replaced = _replace_pi(answer, pi)
    value = evaluate_arithmetic(replaced)
    return replaced if value is None else value
  return answer


def as_number(value: Any) -> float | None:
  """The number a value reads as (commas dropped, or `{,}`), else None."""
  text = str(value)
  try:
    return float(text.replace("{,}", "") if "{,}" in text else text.replace(",", ""))
  except ValueError:
    return None


def _format_interval(prediction: str) -> str:
  for _, pattern, form in _INTERVALS:
    match = re.match(pattern, prediction)
    if match:
      return form.format(match.group(1))
  return prediction


def _first_number(value: str) -> float | None:
  match = _FIRST_NUMBER.search(str(value).strip().replace(",", ""))
  return None if match is None else float(match.group(0))


def _parts_equal(predictions: list[str], references: list[str], include_percentage: bool,
                 tolerance: float) -> bool:
  return len(predictions) == len(references) and all(
      math_equal(p, r, include_percentage=include_percentage, tolerance=tolerance)
      for p, r in zip(predictions, references))


def math_equal(prediction: Any, reference: Any, *, include_percentage: bool = True,
               tolerance: float = 1e-4, pi: float = math.pi) -> bool:
  """Whether `prediction` equals `reference` by the official grader's rules (module doc)."""
  try:
    prediction, reference = normalize(prediction, pi), normalize(reference, pi)
  except (ValueError, OverflowError):   # a base that is not a number: the official raises
    return False
  if isinstance(prediction, str) and len(prediction) > 1000:
    prediction = prediction[:1000]
  if isinstance(prediction, str) and isinstance(reference, str):
    if prediction.strip().lower() == reference.strip().lower():
      return True
    if prediction.replace(" ", "") == reference.replace(" ", ""):
      return True
  predicted, expected = as_number(prediction), as_number(reference)
  if predicted is not None and expected is not None:
    candidates = [expected / 100, expected, expected * 100] if include_percentage else [expected]
    return any(math.isclose(c, predicted, rel_tol=tolerance) for c in candidates)
  if not prediction and prediction not in (0, False):
    return False
  reference, prediction = str(reference).strip(), _format_interval(str(prediction).strip())
  pred_str, ref_str = prediction, reference
  if ((prediction.startswith("[") and prediction.endswith("]") and not reference.startswith("("))
      or (prediction.startswith("(") and prediction.endswith(")")
          and not reference.startswith("["))):
    pred_str, ref_str = pred_str.strip("[]()"), ref_str.strip("[]()")
  for bracket in "{}()":
    pred_str, ref_str = pred_str.replace(bracket, ""), ref_str.replace(bracket, "")
  if pred_str == ref_str:
    return True
  if not prediction or not reference:   # the official raises on an empty reference from here
    return False
  if (prediction[0] in "([" and prediction[-1] in ")]" and prediction[0] == reference[0]
      and prediction[-1] == reference[-1]
      and _parts_equal(prediction[1:-1].split(","), reference[1:-1].split(","),
                       include_percentage, tolerance)):
    return True
  if "," in prediction and "," in reference:
    predictions = [p.strip() for p in prediction.split(",")]
    references = [r.strip() for r in reference.split(",")]
    if len(predictions) == len(references):   # same length: this verdict is final
      return _parts_equal(predictions, references, include_percentage, tolerance)
  if (prediction.startswith("Point") and reference[0] == "(" and reference[-1] == ")"
      and _parts_equal(prediction[prediction.find("(") + 1:-1].split(","),
                       reference[1:-1].split(","), include_percentage, tolerance)):
    return True
  first, second = _first_number(prediction), _first_number(reference)
  if first is None or second is None:   # the official raises (sympy parses "")
    return False
  return first == second or math.isclose(first, second, rel_tol=tolerance)
