"""Grading: final-answer extraction and correctness for GSM8K, MATH, MMLU and the synthetic task.

The bottom of the module graph: it imports nothing of antidistill_jax (data reads answers and
dataset names from here; traces and evaluation grade with it).

`is_correct(dataset, solution, completion)` compares the dataset's gold solution text with a
model's completion text:
  gsm8k: the final number (the last \\boxed{}, else the text after the last "####", else the
         last number in the text), compared as a decimal: "1,000" == "1000", "$5.00" == "5",
         "18%" == "18", and LaTeX thousands separators are read: "10\\,000" == "10{,}000" ==
         "10000".
  math:  the last \\boxed{} of each, compared by math-verify (sympy equivalence: \\frac{1}{2},
         0.5 and 1/2 are equal); a normalized string compare is the fallback when math-verify
         raises or times out. Custom "jsonl:..." datasets are graded this way too.
  mmlu:  the choice letter A-D (MMLU has four choices) from \\boxed{B}, else the last
         "the answer is (B)", "Answer: B", "option B".
  synthetic: the integer right after the last "#" (spaces before it allowed: "#17",
         "#### 17"), else no answer; compared as integers. `data.synthetic.chains` traces
         end "...#17"; a forced answer counts only if its text holds a "#" (no box is read).

Answer forcing (the reference code's second accuracy): the sampler closes the think block of a
finished trace, appends FORCE_ANSWER and generates 32 more greedy tokens *without* the
antidistillation perturbation:

  prefix = answer_forcing_prefix(completion)       # close_think(completion) + FORCE_ANSWER
  forced = <32 greedy teacher tokens after prefix, decoded>
  text = forced_completion_text(completion, forced)
  is_correct(dataset, solution, text)               # the answer-forced grade

A text holding FORCE_ANSWER is correct when its part before the forcing string or its forced
box is, as in the reference's grader; so the forced accuracy is never below the raw one.
"""

from __future__ import annotations

import decimal
import re
import threading
from typing import Sequence

from absl import logging

FORCE_ANSWER = "\n\n**Final Answer**\n\\[\\boxed{"
MATH_VERIFY_TIMEOUT_S = 5  # per parse / compare; math-verify enforces it with SIGALRM

_GRADERS = ("gsm8k", "math", "mmlu", "synthetic")
# The other names of the datasets, the one table of them: lower-case name -> (dataset, split).
# A name with split None is the whole dataset under another name (data.load_split accepts it);
# a name with a split is that split of the dataset (GSM8K-Platinum is the gsm8k loader's
# "platinum" split): it grades like the dataset, and the loader loads it only as
# load_split(dataset, split).
DATASET_ALIASES: dict[str, tuple[str, str | None]] = {
    "hendrycks_math": ("math", None),
    "competition_math": ("math", None),
    "gsm8k_platinum": ("gsm8k", "platinum"),
}

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: optional sign (a "-" glued to a preceding word or digit is a hyphen, not a sign),
# thousands groups "1,000,000" or plain digits, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
                     r"|(?<![\w.])-?\.\d+")
# Thousands separators that LaTeX writers put inside a number: the spacings in 10\,000, 10\!000,
# 10\ 000, 10\;000, the braced comma of 10{,}000, or a Unicode thin / narrow no-break space.
# Only before a group of exactly three digits, so "12\,34" stays two numbers.
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)(?:\\[,!;: ]|\{,\}|[\u2009\u202f])(?=\d{3}(?!\d))")
# "the answer is (B)", "**Answer:** B", "option C is correct", "choice: D".
_MMLU_PATTERN = re.compile(r"(?i:answer|option|choice)(?:\s*is)?[\s:*(\[]*([A-D])(?![\w'])")
_SYNTHETIC_ANSWER = re.compile(r" *(-?\d+)")  # after the last "#"


def grader(dataset: str) -> str:
  """The grading rules ("gsm8k", "math", "mmlu" or "synthetic") of a dataset name (see
  `data.load_split`; "synthetic" names `data.synthetic`'s tasks, which are generated, not loaded).

  Names are matched whole (the reference's `name.split("_")[1]` broke `hendrycks_math_*`);
  a "jsonl:PATH" custom dataset is graded like MATH.
  """
  name = dataset.strip().lower()
  if name.startswith("jsonl:"):
    return "math"
  name = DATASET_ALIASES.get(name, (name, None))[0]
  if name not in _GRADERS:
    raise ValueError(f"unknown dataset {dataset!r}: expected one of {_GRADERS}, "
                     f"{tuple(DATASET_ALIASES)} or 'jsonl:/path/file.jsonl'.")
  return name


# ---------------------------------------------------------------------------------------------
# Text helpers.


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced.

  An unclosed last box (an answer-forced tail cut at 32 tokens) gives the rest of its line.
  """
  starts = [m.end() for m in _BOX.finditer(text)]
  if not starts:
    return None
  start, depth = starts[-1], 1
  for i in range(start, len(text)):
    depth += {"{": 1, "}": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i].strip()
  return text[start:].split("\n", 1)[0].strip()


def close_think(text: str) -> str:
  """`text` with its reasoning block closed: appends "\\n</think>" unless a </think> follows the
  last <think>. R1-style templates open <think> in the prompt, so a completion with no tag at
  all is inside the block too (the reference appends in that case as well)."""
  if text.rfind("</think>") > text.rfind("<think>"):
    return text
  return text + "\n</think>"


def answer_forcing_prefix(completion: str) -> str:
  """The text the sampler continues greedily for 32 tokens to force a final answer."""
  return close_think(completion) + FORCE_ANSWER


def forced_completion_text(completion: str, forced: str) -> str:
  """What is graded for the answer-forced accuracy: the closed trace, FORCE_ANSWER, and the
  decoded 32 greedy tokens `forced` generated after it."""
  return answer_forcing_prefix(completion) + forced


def _numbers(text: str) -> list[str]:
  """The numbers in `text`, with LaTeX/Unicode thousands separators read as commas."""
  text = _THOUSANDS_SEPARATOR.sub(",", text.replace("\u2212", "-"))
  return _NUMBER.findall(text.replace("{,}", ",").replace("\\!", ""))


def _canonical_number(token: str) -> str | None:
  try:
    value = decimal.Decimal(token.replace(",", ""))
  except decimal.InvalidOperation:
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


# ---------------------------------------------------------------------------------------------
# Extraction.


def _gsm8k_answer(text: str) -> str | None:
  boxed = last_boxed(text)
  if boxed is not None and (numbers := _numbers(boxed)):
    return _canonical_number(numbers[-1])
  if "####" in text:
    numbers = _numbers(text.rsplit("####", 1)[1])
    if numbers:
      return _canonical_number(numbers[0])
  numbers = _numbers(text)
  return _canonical_number(numbers[-1]) if numbers else None


def _mmlu_answer(text: str) -> str | None:
  boxed = last_boxed(text)
  if boxed is not None:
    inner = re.sub(r"\\text(?:bf|rm)?\s*\{([^{}]*)\}", r"\1", boxed).strip(" ()[]*$")
    m = re.match(r"([A-Da-d])(?![A-Za-z])", inner)
    if m:
      return m.group(1).upper()
  letters = _MMLU_PATTERN.findall(text)
  return letters[-1] if letters else None


def _math_answer(text: str) -> str | None:
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  if "####" in text:
    return text.rsplit("####", 1)[1].strip() or None
  return None


def _synthetic_answer(text: str) -> str | None:
  if "#" not in text:
    return None
  m = _SYNTHETIC_ANSWER.match(text.rsplit("#", 1)[1])
  return str(int(m.group(1))) if m else None


def answer_start(dataset: str, text: str) -> int | None:
  """Where the final answer of a completion begins (a character offset), or None: synthetic,
  the last "#" (`data.synthetic.token_roles`' answer span); otherwise the last \\boxed (or
  \\fbox), else the last "####". What the answer-aligned g takes its loss on (`aligned`)."""
  if grader(dataset) == "synthetic":
    cut = text.rfind("#")
    return None if cut < 0 else cut
  boxes = [m.start() for m in _BOX.finditer(text)]
  if boxes:
    return boxes[-1]
  cut = text.rfind("####")
  return None if cut < 0 else cut


def extract_answer(dataset: str, text: str) -> str | None:
  """The final answer in `text` (a gold solution or a completion), or None if there is none.

  gsm8k: a canonical number string ("1000", "-3", "2.5"); mmlu: a letter; math: the LaTeX of
  the last box (or the text after "####"); synthetic: a canonical integer string.
  """
  kind = grader(dataset)
  return {"gsm8k": _gsm8k_answer, "mmlu": _mmlu_answer, "math": _math_answer,
          "synthetic": _synthetic_answer}[kind](text)


# ---------------------------------------------------------------------------------------------
# Comparison.


def _normalize_latex(answer: str) -> str:
  s = re.sub(r"\\text(?:bf|rm)?\s*\{([^{}]*)\}", r"\1", answer)
  for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                   ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                   ("^{\\circ}", ""), ("\\$", ""), ("$", ""), ("\\%", ""), ("%", "")):
    s = s.replace(old, new)
  return re.sub(r"\s+", "", s).rstrip(".").lower()


_warned_thread = False


def _math_verify_equal(gold: str, pred: str) -> bool:
  """math-verify's verdict on two boxed answers; raises if math-verify cannot run here."""
  import math_verify  # imported lazily: it pulls in sympy and antlr
  timeout = MATH_VERIFY_TIMEOUT_S
  parsed_gold = math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
  parsed_pred = math_verify.parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
  if not parsed_gold or not parsed_pred:
    return False
  return bool(math_verify.verify(parsed_gold, parsed_pred, timeout_seconds=timeout))


def _math_equal(gold: str, pred: str) -> bool:
  """Equal as normalized strings, else by math-verify; False when math-verify fails."""
  if _normalize_latex(gold) == _normalize_latex(pred):
    return True
  from math_verify.errors import TimeoutException  # a BaseException, not an Exception
  try:
    return _math_verify_equal(gold, pred)
  except (Exception, TimeoutException):
    global _warned_thread
    if threading.current_thread() is not threading.main_thread() and not _warned_thread:
      _warned_thread = True
      logging.warning("math-verify times out with SIGALRM, which works only in the main "
                      "thread; grading MATH by normalized string compare here.")
    return False


def _is_correct_once(kind: str, solution: str, completion: str) -> bool:
  if kind == "math":
    gold = _math_answer(solution) or solution.strip()
    pred = _math_answer(completion)
    return pred is not None and _math_equal(gold, pred)
  gold = extract_answer(kind, solution)
  pred = extract_answer(kind, completion)
  if gold is None or pred is None:
    return False
  if kind == "gsm8k":
    return decimal.Decimal(gold) == decimal.Decimal(pred)
  return gold == pred


def is_correct(dataset: str, solution: str, completion: str) -> bool:
  """Whether `completion` reaches the final answer of the gold `solution` text."""
  kind = grader(dataset)
  if FORCE_ANSWER not in completion:
    return _is_correct_once(kind, solution, completion)
  trace, forced = completion.rsplit(FORCE_ANSWER, 1)
  return (_is_correct_once(kind, solution, trace)
          or _is_correct_once(kind, solution, "\\boxed{" + forced))


def accuracy(dataset: str, solutions: Sequence[str], completions: Sequence[str]) -> float:
  """Fraction of completions graded correct against their solutions."""
  if len(solutions) != len(completions):
    raise ValueError(f"{len(solutions)} solutions but {len(completions)} completions.")
  if not solutions:
    raise ValueError("accuracy of no examples.")
  return sum(is_correct(dataset, s, c) for s, c in zip(solutions, completions)) / len(solutions)
