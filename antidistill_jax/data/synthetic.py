"""A seeded synthetic task that needs no download: sums of small numbers, GSM8K-formatted.

  examples = sums(64, split="train", seed=0)   # Example("What is 3 + 5 + 2?", "3 + 5 = 8\n...")

Each split draws from its own stream (seed and split name), so train, holdout and test never
share a generator state. The solution accumulates left to right and ends with "#### <sum>", so
the GSM8K grader reads the answer.
"""

from __future__ import annotations

import zlib

import numpy as np

from antidistill_jax.data.records import Example


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
