"""A lambda from a target a user understands: how much less likely, to the teacher itself, the
antidistilled text is than plain text.

  lam, ladder = lam_for_logprob_drop(sampler, prompts, params, drop=1.0)

Lambda's scale depends on the proxy, on g's norm and on the holdout set g came from, so no number
carries over between models (lam = 5 turns SmolLM2 into junk; 0.005 changes words). The drop is
comparable across models: the teacher's mean log-prob per generated token (at temperature 1,
unperturbed: `Generation.logprobs`) under plain sampling, minus the same under ADS at lam, on a
few prompts with the same sampling seeds. It grows with lam; `lam_for_logprob_drop` brackets the
target by doubling lam, then bisects in log lam. lam is traced in the decode program, so the
whole search compiles two programs (plain sampling, which skips the proxy, and ADS), however
many lams it tries.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np

# A drop beyond this many nats per token is text the teacher finds implausible at every token:
# the traces have collapsed (junk tokens, or rows that end at once).
COLLAPSE_DROP = 4.0


def mean_logprob(generation) -> float:
  """The teacher's mean log-prob per generated token, over every row's tokens."""
  values = [lp for lp in generation.logprobs if len(lp)]
  return float(np.mean(np.concatenate(values))) if values else float("nan")


def logprob_drop(sampler, prompts: Sequence[Sequence[int]], params, lam: float,
                 plain: float | None = None) -> float:
  """plain mean teacher log-prob minus the mean under ADS at `lam` (same seeds)."""
  if plain is None:
    plain = mean_logprob(sampler(prompts, dataclasses.replace(params, lam=0.0)))
  return plain - mean_logprob(sampler(prompts, dataclasses.replace(params, lam=float(lam))))


def lam_for_logprob_drop(sampler, prompts: Sequence[Sequence[int]], params, drop: float, *,
                         start: float = 1e-3, max_lam: float = 1e6, steps: int = 8,
                         tolerance: float = 0.1) -> tuple[float, list[tuple[float, float]]]:
  """The lam at which ADS lowers the teacher's mean log-prob per token by about `drop` nats on
  these prompts; also every (lam, drop) measured. Doubling from `start` brackets the target,
  then up to `steps` bisections in log lam stop within `tolerance` (relative) of it. Sampling
  noise makes the drop only roughly monotone in lam: the lam returned is the measured one
  closest to the target. A target no lam up to max_lam reaches warns and returns the lam of
  the largest drop."""
  if drop <= 0:
    raise ValueError(f"drop={drop}: the target must be a positive number of nats per token.")
  plain = mean_logprob(sampler(prompts, dataclasses.replace(params, lam=0.0)))
  ladder: list[tuple[float, float]] = []
  measure = lambda lam: ladder.append((lam, logprob_drop(sampler, prompts, params, lam, plain)))
  lo, hi = 0.0, float(start)
  measure(hi)
  while ladder[-1][1] < drop:
    lo, hi = hi, hi * 2.0
    if hi > max_lam:
      best = max(ladder, key=lambda x: x[1])
      warnings.warn(f"no lam up to {max_lam:g} lowers the teacher's log-prob by {drop} nats per "
                    f"token (the most: {best[1]:.3f} at lam {best[0]:g}, used): a teacher whose "
                    "log-probs hardly depend on the token (a random model), or g near zero.",
                    RuntimeWarning, stacklevel=2)
      return best[0], ladder
    measure(hi)
  for _ in range(steps):
    if abs(ladder[-1][1] - drop) <= tolerance * drop:
      break
    mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
    measure(mid)
    if ladder[-1][1] < drop:
      lo = mid
    else:
      hi = mid
  best = min(ladder, key=lambda x: abs(x[1] - drop))
  return best[0], ladder


def warn_if_collapsed(drop: float, lam: float, knob: str) -> None:
  """A warning that names the knob when ADS text is far less likely than plain text."""
  if drop > COLLAPSE_DROP:
    warnings.warn(
        f"at lam={lam:g} the teacher's mean log-prob per token is {drop:.1f} nats below plain "
        f"sampling: the antidistilled text has likely collapsed into junk. Lower {knob} (or "
        "calibrate it: a drop of ~1 nat/token keeps text readable).", RuntimeWarning,
        stacklevel=2)
