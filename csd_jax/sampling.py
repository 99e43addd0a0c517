"""How tokens are drawn: the one sampling dataclass of the project.

`Sampling` is the `sampling` section of the config's `onpolicy` and `eval` (YAML keys
`temperature`, `top_k`, `top_p`, `no_repeat_ngram_size`), what on-policy distillation and
evaluation hand to the sampler, and a static argument of the jitted sampler (frozen, hashable).
It is checked once, when built; the defaults are the paper's (temperature 1, everything else
off). `GREEDY` is `generate`'s default.

This module imports nothing of csd_jax but its errors, so that config, models, on-policy and
evaluation can all use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from csd_jax.errors import UserError

_INTEGER_FIELDS = ("top_k", "no_repeat_ngram_size")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Temperature 0 is greedy; top_k 0, top_p 1 and no_repeat_ngram_size 0 are off.

  Raises:
    UserError: a field out of its range (the message names the field and the range).
  """

  temperature: float = 1.0
  top_k: int = 0                  # keep the k most likely tokens; 0: off
  top_p: float = 1.0              # nucleus mass; 1: off
  no_repeat_ngram_size: int = 0   # n > 0 forbids repeating an n-gram; 0: off (paper's option: 6)

  def __post_init__(self) -> None:
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      integer = field.name in _INTEGER_FIELDS
      # bool is a number to Python but never a meant one; an integer field takes 2.0, not 2.5
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or (integer and not float(value).is_integer())):
        raise UserError(f"{field.name}={value!r}: expected "
                        f"{'an integer' if integer else 'a number'}")
      # one canonical type per field, so that equal settings hash alike (a jit static argument)
      object.__setattr__(self, field.name, int(value) if integer else float(value))
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise UserError(f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p={self.top_p}: must be within 0 < top_p <= 1 (1 = off)")
    if self.no_repeat_ngram_size < 0:
      raise UserError(f"no_repeat_ngram_size={self.no_repeat_ngram_size}: must be >= 0 "
                      "(0 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = Sampling(temperature=0.0)
