"""The trainer's one-line progress display: step/total, loss, tokens/s, MFU and ETA."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
  """A one-line progress display: step/total, loss, tokens/s, MFU and ETA.

  On a TTY the line is redrawn in place (carriage return); otherwise each shown update is its own
  line. Updates closer than `min_interval_s` to the last shown one are held back (the final step
  and `close()` show them). The ETA is the mean step time since the first update (excluded: it
  includes compilation) times the steps left, so a resumed run needs no start step.
  """

  def __init__(self, total_steps: int, *, stream: TextIO = sys.stderr,
               min_interval_s: float = 0.5):
    self.total_steps, self.stream, self.min_interval_s = total_steps, stream, min_interval_s
    self._tty = bool(getattr(stream, "isatty", lambda: False)())
    self._first: tuple[int, float] | None = None  # (step, time) of the first update
    self._last_shown = -math.inf  # time.monotonic() of the last shown update
    self._width, self._pending = 0, None

  def update(self, step: int, *, loss: float, tokens_per_s: float,
             mfu: float | None = None) -> None:
    """Records `step` (done) with its loss, throughput and MFU fraction; maybe redraws."""
    now = time.monotonic()
    if self._first is None:
      self._first = (step, now)
    first_step, first_time = self._first
    eta = "?"
    if step > first_step:
      eta = _duration((now - first_time) / (step - first_step) * max(self.total_steps - step, 0))
    parts = [f"step {step}/{self.total_steps}", f"loss {float(loss):.4f}",
             f"{float(tokens_per_s):,.0f} tokens/s"]
    if mfu is not None:
      parts.append(f"MFU {100 * float(mfu):.1f}%")
    self._pending = " | ".join(parts + [f"ETA {eta}"])
    if now - self._last_shown >= self.min_interval_s or step >= self.total_steps:
      self._show()
      self._last_shown = now

  def _show(self) -> None:
    line, self._pending = self._pending, None
    if self._tty:
      self.stream.write("\r" + line.ljust(self._width))
      self._width = len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    """Shows the last update if it was held back and ends the line."""
    if self._pending is not None:
      self._show()
    if self._tty and self._width:
      self.stream.write("\n")
      self.stream.flush()
    self._width = 0
