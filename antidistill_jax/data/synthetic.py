"""Seeded synthetic tasks that need no download: sums of small numbers.

  examples = sums(64, split="train", seed=0)    # Example("What is 3 + 5 + 2?", "3 + 5 = 8\n...")
  examples = chains(64, split="train", seed=0)  # Example("3+5+2+7", "3+5=8;8+2=10;7+10=17#17")

`sums` is GSM8K-formatted (the solution ends with "#### <sum>", so the GSM8K grader reads it).
`chains` is the task tiny models trained from scratch learn (`task_models`): the problem is the
terms, the solution a chain of steps "a+b=c" that accumulates the running total, then "#" and
the sum; graded with the "synthetic" rules (`grading`: the integer after the last "#"). Its
writing has free choices a student can copy from its teacher's traces (`style` reads them):
  order="free":       each step writes the running total first or second, at random;
  separators=(";", ","): steps are joined by one of them, chosen per trace;
  direction="free":   a trace accumulates left to right or right to left, chosen per trace.

Each split draws from its own streams (seed and split name), so no two splits share a
generator state. For `chains`, the splits "train", "holdout" and "test" also never share a
problem: a hash of (seed, problem) assigns every problem to one of them (SPLIT_SHARES), and a
split keeps only its own; any other split name draws from every problem.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

from antidistill_jax.data.records import Example

# The part of the problem space each named split of `chains` draws from.
SPLIT_SHARES = {"test": 0.1, "holdout": 0.1, "train": 0.8}
ORDERS = ("free", "fixed")
DIRECTIONS = ("left", "free")
_MAX_TRIES = 1000  # draws per example before a split is declared empty

_STEP = re.compile(r"(-?\d+)\+(-?\d+)=(-?\d+)")


def sums(n: int, *, split: str, seed: int = 0, min_terms: int = 2, max_terms: int = 3,
         max_value: int = 9) -> list[Example]:
  """`n` problems "What is a + b (+ c)?" with a worked, accumulating solution."""
  rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
  out = []
  for i in range(n):
    terms = rng.integers(1, max_value + 1, int(rng.integers(min_terms, max_terms + 1))).tolist()
    steps, total = [], terms[0]
    for t in terms[1:]:
      steps.append(f"{total} + {t} = {total + t}")
      total += t
    out.append(Example(problem=f"What is {' + '.join(map(str, terms))}?",
                       solution="\n".join(steps) + f"\n#### {total}", answer=str(total),
                       source_index=i))
  return out


# -- chains -----------------------------------------------------------------------------------


def problem_text(terms: Sequence[int]) -> str:
  return "+".join(map(str, terms))


def parse_problem(problem: str) -> list[int]:
  """The terms of a `chains` problem ("3+5+2" -> [3, 5, 2])."""
  return [int(t) for t in problem.strip().split("+")]


def split_of(problem: str, seed: int) -> str:
  """The named split ("test", "holdout" or "train") a problem belongs to under `seed`."""
  u = zlib.crc32(f"{seed}|{problem}".encode()) / 2**32
  for name, share in SPLIT_SHARES.items():
    if u < share:
      return name
    u -= share
  return name


def trace(terms: Sequence[int], *, separator: str = ";",
          accumulator_first: bool | Sequence[bool] = True, reverse: bool = False) -> str:
  """The worked solution of `terms`: steps "a+b=c" joined by `separator`, then "#<sum>".

  The running total starts at the first term (the last when `reverse`) and each step adds the
  next one; accumulator_first (one flag, or one per step) says whether the total is written
  before the term. trace([3, 5, 2], accumulator_first=[True, False]) == "3+5=8;2+8=10#10".
  """
  seq = list(terms)[::-1] if reverse else list(terms)
  flags = accumulator_first
  if isinstance(flags, (bool, np.bool_)):
    flags = [bool(flags)] * (len(seq) - 1)
  if len(flags) != len(seq) - 1:
    raise ValueError(f"{len(flags)} accumulator_first flags for {len(seq) - 1} steps.")
  steps, total = [], seq[0]
  for t, first in zip(seq[1:], flags):
    a, b = (total, t) if first else (t, total)
    steps.append(f"{a}+{b}={total + t}")
    total += t
  return separator.join(steps) + f"#{total}"


def chains(n: int, *, split: str, seed: int = 0, min_terms: int = 3, max_terms: int = 5,
           max_value: int = 9, order: str = "free", separators: Sequence[str] = (";", ","),
           direction: str = "left", stream: int = 0) -> list[Example]:
  """`n` problems "a+b+c(+d(+e))" of terms in [1, max_value], each with one valid solution.

  The problems of a (seed, split) do not depend on the writing options (order, separators,
  direction): those draw from a stream of their own. Problems may repeat within a split.
  stream > 0 draws other problems from the same split (its part of the problem space does not
  change): e.g. a teacher's training data, kept off the test problems.
  """
  if not 2 <= min_terms <= max_terms:
    raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}.")
  if order not in ORDERS or direction not in DIRECTIONS:
    raise ValueError(f"order {order!r} / direction {direction!r}: expected one of {ORDERS} / "
                     f"{DIRECTIONS}.")
  if not separators:
    raise ValueError("separators is empty.")
  tag = zlib.crc32(split.encode())
  base = [seed, tag] if not stream else [seed, tag, 2, stream]
  problems = np.random.default_rng(base)
  writing = np.random.default_rng(base + [1])
  out = []
  for i in range(n):
    for _ in range(_MAX_TRIES):
      terms = problems.integers(1, max_value + 1,
                                int(problems.integers(min_terms, max_terms + 1))).tolist()
      if split not in SPLIT_SHARES or split_of(problem_text(terms), seed) == split:
        break
    else:
      raise ValueError(f"split {split!r} holds no problem of {min_terms}-{max_terms} terms in "
                       f"[1, {max_value}] under seed {seed}.")
    separator = separators[int(writing.integers(len(separators)))]
    reverse = direction == "free" and bool(writing.random() < 0.5)
    flags = (writing.random(len(terms) - 1) < 0.5).tolist() if order == "free" else True
    solution = trace(terms, separator=separator, accumulator_first=flags, reverse=reverse)
    out.append(Example(problem=problem_text(terms), solution=solution,
                       answer=str(sum(terms)), source_index=i))
  return out


# -- style probe ------------------------------------------------------------------------------


def _direction(first_step: tuple[int, int, int], terms: Sequence[int]) -> str | None:
  """"left" or "right" when the first step's operands are the first (last) two terms only."""
  if len(terms) < 2:
    return None
  operands = sorted(first_step[:2])
  left = operands == sorted(terms[:2])
  right = operands == sorted(terms[-2:])
  return "left" if left and not right else "right" if right and not left else None


def style(completion: str, problem: str | None = None) -> dict:
  """The writing choices of one `chains` trace.

  separator: ";" or "," (the one between steps), "mixed", or None (fewer than two steps);
  direction: "left" / "right" (needs `problem`; None when its first two and last two terms
    are the same pair, or the first step uses neither);
  accumulator_first: the share of steps that write the running total before the term (steps
    where the two operands are equal, or neither is the total, are not counted; the first
    step counts only when the direction is known), None when no step counts;
  steps: the number of "a+b=c" steps before the last "#".
  """
  body = completion.rsplit("#", 1)[0] if "#" in completion else completion
  steps = [tuple(int(x) for x in m) for m in _STEP.findall(body)]
  seps = set(re.findall(r"[;,]", body))
  separator = None if len(steps) < 2 or not seps else seps.pop() if len(seps) == 1 else "mixed"
  terms = parse_problem(problem) if problem is not None else None
  direction = _direction(steps[0], terms) if steps and terms else None
  flags = []
  for i, (a, b, c) in enumerate(steps):
    if i == 0:
      total = None if direction is None else terms[0] if direction == "left" else terms[-1]
    else:
      total = steps[i - 1][2]
    if total is not None and a != b and total in (a, b):
      flags.append(a == total)
  return dict(separator=separator, direction=direction, steps=len(steps),
              accumulator_first=float(np.mean(flags)) if flags else None)


ROLES = ("answer", "writing", "reasoning")


def token_roles(completion: str) -> list[str]:
  """The role of each character of a `chains` trace, for splitting a student's NLL:
  "answer": the last "#" and the answer after it;
  "writing": where a writing choice is made: the separators between steps and the first
    character of each step (which operand comes first);
  "reasoning": the rest (operands after their first character, "+", "=", the results).
  A character that is none of these in an ill-formed trace is "reasoning"."""
  cut = completion.rfind("#")
  body = completion if cut < 0 else completion[:cut]
  roles = ["reasoning"] * len(body) + ["answer"] * (len(completion) - len(body))
  step_start = True
  for i, ch in enumerate(body):
    if ch in ";,":
      roles[i] = "writing"
      step_start = True
    elif step_start:
      roles[i] = "writing"
      step_start = False
  return roles


def style_summary(completions: Sequence[str], problems: Sequence[str] | None = None) -> dict:
  """Shares over traces: semicolon (of traces with a separator, those joined by ";"), right
  (of traces with a known direction, right to left), accumulator_first (mean of the traces'
  shares), each None when no trace tells."""
  problems = problems if problems is not None else [None] * len(completions)
  styles = [style(c, p) for c, p in zip(completions, problems)]
  share = lambda xs: float(np.mean(xs)) if xs else None
  return dict(
      semicolon=share([s["separator"] == ";" for s in styles if s["separator"] in (";", ",")]),
      right=share([s["direction"] == "right" for s in styles if s["direction"]]),
      accumulator_first=share([s["accumulator_first"] for s in styles
                               if s["accumulator_first"] is not None]),
      traces=len(styles))
