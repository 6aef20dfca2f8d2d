"""Examples, source-file readers and the seeded train/holdout split.

Every dataset becomes a list of `Example(problem, solution, answer, source_index)`: `problem`
is what the user turn shows, `solution` the gold solution text graded against (see
`grading.is_correct`), `answer` its final answer, `source_index` the row in the source
(the pooled train files for train/holdout) so a split can be traced back to the raw data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from antidistill_jax import grading

TRAIN_FRACTION = 0.7
DEFAULT_SEED = 42  # the reference's seed (whose shuffle it then discarded)


@dataclasses.dataclass(frozen=True)
class Example:
  problem: str
  solution: str
  answer: str
  source_index: int = -1


def read_records(path: str | os.PathLike[str], fmt: str | None = None) -> list[dict[str, Any]]:
  """Rows of a .jsonl or .parquet file (`fmt` overrides the suffix: downloads have none)."""
  path = os.fspath(path)
  fmt = fmt or os.path.splitext(path)[1].lstrip(".")
  if fmt == "jsonl":
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  if fmt == "parquet":
    import pyarrow.parquet as pq  # a tensorflow-datasets dependency
    return pq.read_table(path).to_pylist()
  raise ValueError(f"{path}: unknown format {fmt!r}; expected jsonl or parquet.")


def split_train_holdout(items: Sequence[Any], seed: int,
                        train_fraction: float = TRAIN_FRACTION) -> tuple[list[Any], list[Any]]:
  """A seeded shuffle, then the first `train_fraction` is train and the rest holdout.

  The permutation is actually applied (the reference shuffled and dropped the result, so its
  split followed file order). GSM8K's 7,473 train rows give 5,231 / 2,242.
  """
  order = np.random.default_rng(seed).permutation(len(items))
  n_train = int(len(items) * train_fraction)
  return [items[i] for i in order[:n_train]], [items[i] for i in order[n_train:]]


def example_from_row(row: Mapping[str, Any], index: int, dataset: str = "math") -> Example:
  """An Example from a {problem, solution} or {question, answer} row (GSM8K's field names).

  `answer` is the row's own "answer" field when it also has a "solution", else the final
  answer extracted from the solution with `dataset`'s rules.
  """
  if "problem" in row and "solution" in row:
    problem, solution = row["problem"], row["solution"]
    answer = row.get("answer")
  elif "question" in row and "answer" in row:
    problem, solution, answer = row["question"], row["answer"], None
  else:
    raise ValueError(f"row {index} has fields {sorted(row)}; expected problem/solution or "
                     "question/answer.")
  if answer is None:
    answer = grading.extract_answer(dataset, solution) or ""
  return Example(str(problem), str(solution), str(answer), index)


def examples_from_rows(rows: Iterable[Mapping[str, Any]], dataset: str = "math") -> list[Example]:
  return [example_from_row(row, i, dataset) for i, row in enumerate(rows)]
