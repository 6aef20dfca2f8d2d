"""Statistics of a replicated study: a mean over seeds with its t interval, a bootstrap check,
the paired test and the effect the design can detect.

  s = summarize([+0.05, -0.02, 0.11, ...])   # one value per seed (a paired difference)
  s["mean"], s["ci"], s["p"], s["mde"]

Pure functions over lists of floats (None: missing, dropped; `n` counts what is left, so
every summary says how many seeds stand behind it). scipy comes with jax.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ALPHA = 0.05  # two-sided
POWER = 0.80
BOOTSTRAP = 10_000  # resamples
BOOTSTRAP_SEED = 0


def present(xs: Sequence[float | None]) -> list[float]:
  return [float(x) for x in xs if x is not None and not math.isnan(x)]


def excludes_zero(ci: Sequence[float] | None) -> bool:
  """Whether an interval (lo, hi) lies wholly on one side of 0 (False for None)."""
  return ci is not None and (ci[0] > 0 or ci[1] < 0)


def mde(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float | None:
  """The smallest true mean a two-sided one-sample t-test at `alpha` detects with `power`,
  for n values of standard deviation sd: (t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)
  (the usual approximation; None below 2 values)."""
  from scipy import stats
  if n < 2:
    return None
  return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd /
               math.sqrt(n))


def bootstrap_ci(xs: Sequence[float], *, alpha: float = ALPHA, resamples: int = BOOTSTRAP,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
  """Percentile interval of the mean over resamples of the values (seeds) with replacement."""
  xs = np.asarray(present(xs))
  if len(xs) < 2:
    return None
  rng = np.random.default_rng(seed)
  means = xs[rng.integers(0, len(xs), (resamples, len(xs)))].mean(axis=1)
  lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi)


def summarize(xs: Sequence[float | None], *, alpha: float = ALPHA, power: float = POWER,
              resamples: int = BOOTSTRAP) -> dict:
  """n, mean, sd, the t interval `ci`, the bootstrap interval `bootstrap_ci`, the two-sided
  p-value of mean = 0 (a paired test when the values are paired differences) and the minimal
  detectable effect `mde` at this n and sd. Fields that need 2 values are None below that
  (and the bootstrap interval with resamples=0)."""
  from scipy import stats
  xs = present(xs)
  n = len(xs)
  out = dict(n=n, mean=None, sd=None, ci=None, bootstrap_ci=None, p=None, mde=None)
  if n == 0:
    return out
  mean = float(np.mean(xs))
  out["mean"] = mean
  if n < 2:
    return out
  sd = float(np.std(xs, ddof=1))
  half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
  boot = bootstrap_ci(xs, alpha=alpha, resamples=resamples) if resamples else None
  out.update(sd=sd, ci=(mean - half, mean + half), bootstrap_ci=boot,
             mde=mde(sd, n, alpha=alpha, power=power))
  if sd > 0:
    out["p"] = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
  else:
    out["p"] = 1.0 if mean == 0 else 0.0
  return out


def known_sd(mean: float, se: float, *, alpha: float = ALPHA, power: float = POWER) -> dict:
  """One estimate whose standard error comes from elsewhere (a noise SD measured by a study,
  not by this run): the normal interval `ci`, the two-sided p of mean = 0 and the smallest
  true value detected at `power` (z_{1-alpha/2} + z_power) se: the fields of `summarize`."""
  from scipy import stats
  z = float(stats.norm.ppf(1 - alpha / 2))
  p = float(2 * stats.norm.sf(abs(mean) / se)) if se > 0 else (1.0 if mean == 0 else 0.0)
  return dict(n=1, mean=mean, sd=se, ci=(mean - z * se, mean + z * se), bootstrap_ci=None, p=p,
              mde=(z + float(stats.norm.ppf(power))) * se)


def fmt_summary(s: dict, *, points: bool = True) -> str:
  """"+4.1 [-2.0, +10.2]" (percentage points when `points`, for accuracy differences)."""
  if s["mean"] is None:
    return "-"
  k = 100.0 if points else 1.0
  if s["ci"] is None:
    return f"{k * s['mean']:+.1f}" if points else f"{s['mean']:+.3f}"
  lo, hi = s["ci"]
  if points:
    return f"{k * s['mean']:+.1f} [{k * lo:+.1f}, {k * hi:+.1f}]"
  return f"{s['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
