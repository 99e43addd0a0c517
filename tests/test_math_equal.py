"""The GSM8K grader: answer extraction and the official `math_equal` verdicts on hand-made cases.

Every expected verdict is what the official eval_gsm.py + grader.py give (checked against them
where they give one); the cases where the official crashes or loops are marked.
"""

import math

import pytest

from csd_jax.eval.tasks import gsm8k
from csd_jax.eval.tasks.math_equal import evaluate_arithmetic, math_equal


@pytest.mark.parametrize("output,answer", [
    ("She has 12 + 2 = 14 apples.\n#### 14", "14"),
    ("#### $1,000 dollars\nand more text", "$1,000 dollars"),
    ("First #### 5 #### 6", "5"),          # the text after the first mark, up to the next
    ("work\n####\n18", ""),                 # the mark's own line is empty: an empty answer
    ("The answer is 14.", None),            # no mark: no answer
])
def test_the_answer_is_the_line_after_the_first_mark(output, answer):
  assert gsm8k.extract_answer(output) == answer


def test_the_reference_answer_and_the_prompt():
  assert gsm8k.reference_answer("3 + 4 = <<3+4=7>>7\n#### 7") == "7"
  assert gsm8k.reference_answer("no mark") is None
  assert gsm8k.question_prompt("How many?") == "Q: How many? \n\nA:"


@pytest.mark.parametrize("answer,reference,correct", [
    ("18", "18", True),
    ("18.00", "18", True),
    ("$18", "18", True),                   # a dollar sign before a number is dropped
    ("18 dollars", "18", True),            # units: the first number counts
    ("18 cm^2", "18", True),
    ("x = 18", "18", True),
    ("5 apples and 18 oranges", "18", False),   # ... and only the first
    ("1,234", "1234", True),               # commas in numbers
    ("1,000", "1,000", True),
    ("12,345.67", "12345.67", True),
    ("-3", "-3", True),                    # negative numbers
    ("-3", "3", False),
    ("3", "-3", False),
    ("18.01", "18", True),                 # relative tolerance 1e-3
    ("18.1", "18", False),
    ("1800", "18", True),                  # x 100 and / 100 count (percentages either way)
    ("0.18", "18", True),
    ("50%", "50", True),
    ("3/4", "3/4", True),                  # fractions: equal as written ...
    ("0.75", "3/4", False),                # ... not as values: the first number of 3/4 is 3
    ("1/2", "0.5", False),
    ("3/4", "3", True),                    # (3/4's first number is 3)
    ("Eighteen", "eighteen", True),        # texts: case and spaces ignored
    ("", "18", False),                     # an empty answer is wrong
    (None, "18", False),                   # no #### is wrong
    ("eighteen", "18", False),             # no number (the official crashes here)
    ("6,-2", "6", True),                   # commas dropped before the first number
    ("(1, 2)", "(1, 2)", True),
    ("x_2", "2", False),                   # a base that is not a number (official: ValueError)
])
def test_verdicts(answer, reference, correct):
  assert gsm8k.is_correct(answer, reference) is correct


@pytest.mark.parametrize("answer,reference,correct", [
    ("25\\pi", "78.5", True),              # right with pi = 3.14 (tolerance 1e-4 there)
    ("78.54", "25\\pi", True),             # right with pi = 3.14159...
    ("78.6", "25\\pi", False),
    ("900\\pi", "2827.43", True),          # a digit before \pi (the official loops forever)
    ("2+\\pi", "5.1416", True),            # 1*pi where no digit precedes
    ("\\frac{\\pi}{2}", "1.5708", False),  # not arithmetic: stays text
])
def test_pi_verdicts(answer, reference, correct):
  assert gsm8k.is_correct(answer, reference) is correct


def test_math_equal_options_and_arithmetic():
  assert math_equal("0.5", "50") and not math_equal("0.5", "50", include_percentage=False)
  assert math_equal("18.01", "18", tolerance=1e-3) and not math_equal("18.01", "18")
  assert math_equal("\\pi", "3.14", pi=3.14) and not math_equal("\\pi", "3.15")
  assert evaluate_arithmetic("900*3.14") == pytest.approx(2826.0)
  assert evaluate_arithmetic("(1*3.14, 2)") == (3.14, 2)
  assert evaluate_arithmetic("__import__('os')") is None   # never Python's eval
  assert evaluate_arithmetic("2**100000") is None and evaluate_arithmetic("1/0") is None
  assert gsm8k.PI_VALUES == (math.pi, 3.14) and gsm8k.TOLERANCE == 1e-3
