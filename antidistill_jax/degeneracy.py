"""Answer-blind degeneracy rules for served traces: what a distiller drops before training.

The two rules of the public filter of The Distillation Game's code (ysfalh/distillation-game,
branch mahdi, filtering_traces/), fixed, not fitted to any data:

  script  a letter from a script an English maths trace should not hold: alphabetic, and its
          Unicode name says neither LATIN nor GREEK nor MATHEMATICAL (CJK, Cyrillic, Arabic,
          ...), `min_foreign_run` of them in a row (1: any one);
  repeat  one token `min_copies` times in a row (8 there); with max_period = p > 1, also any
          block of up to p tokens repeated min_copies times in a row (a loop of short phrases).

`check(row, rules)` reads a trace row's decoded completion and completion_ids; it returns the
first rule a trace breaks, or None.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Rules:
  min_foreign_run: int = 1  # foreign-script letters in a row that flag a trace (0: rule off)
  min_copies: int = 8  # copies in a row of a token (or block) that flag a trace (0: rule off)
  max_period: int = 1  # longest repeated block checked, in tokens (1: single tokens only)

  def __post_init__(self):
    if self.min_foreign_run < 0 or self.min_copies < 0 or self.max_period < 1:
      raise ValueError(f"degeneracy rules {self}: counts must be >= 0 and max_period >= 1.")
    if self.min_copies == 1:
      raise ValueError("degeneracy min_copies=1 flags every non-empty trace: use 0 (off) or "
                       ">= 2.")


@functools.lru_cache(maxsize=None)
def _foreign(ch: str) -> bool:
  if not ch.isalpha():
    return False
  name = unicodedata.name(ch, "")
  return not any(s in name for s in ("LATIN", "GREEK", "MATHEMATICAL"))


def longest_foreign_run(text: str) -> int:
  """The most foreign-script letters in a row in `text`."""
  best = run = 0
  for ch in text:
    run = run + 1 if _foreign(ch) else 0
    best = max(best, run)
  return best


def most_copies(ids: Sequence[int], max_period: int = 1) -> int:
  """The most copies in a row of any block of 1..max_period tokens in `ids` (1 for a
  non-empty sequence without repeats, 0 for an empty one)."""
  ids = list(ids)
  best = 1 if ids else 0
  for p in range(1, max_period + 1):
    # same[i]: ids[i] == ids[i + p]; a run of k * p such positions is k + 1 copies.
    run = 0
    for i in range(len(ids) - p):
      run = run + 1 if ids[i] == ids[i + p] else 0
      best = max(best, run // p + 1)
  return best


def check(row: dict[str, Any], rules: Rules) -> str | None:
  """"script" or "repeat" (the first rule the trace breaks), or None for a clean trace."""
  if rules.min_foreign_run and longest_foreign_run(row["completion"]) >= rules.min_foreign_run:
    return "script"
  if rules.min_copies and most_copies(row["completion_ids"], rules.max_period) >= \
      rules.min_copies:
    return "repeat"
  return None
