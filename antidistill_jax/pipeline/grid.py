"""The experiment's grid: one Point per trace set, one Student per model distilled from it,
split over independent jobs by --shard.

ADS at each tau in grid.ads_taus with lam = b * eps for b in grid.ads_lam_over_eps (or the lams
the calibrate stage chose), the temperature baseline at each tau in grid.temperatures with
lam = 0, and the A/A control at each tau in grid.controls: plain sampling again, from another
sampling stream, analysed exactly as a defence would be (its gap must be consistent with
zero), and the product-of-experts defence at each tau in grid.poe_taus and gamma in
grid.poe_gammas (kind "poe", lam = gamma; `sampling.adjustment`), and with grid.aligned ADS
with the answer-aligned g (kind "aligned") at the ADS taus and its own calibrated lams (the ADS
lams without calibration). Each trace set gets
grid.students students (replicates: distillation seeds). `shard=(i, n)` runs the points whose
index is i mod n.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from antidistill_jax import errors


# A sampling stream's seed is sample.seed + stream * STREAM_STRIDE (stream 0: the grid's own);
# a replicate student's distillation seed is distill.seed + replicate * REPLICATE_STRIDE.
STREAM_STRIDE = 1_000_003
REPLICATE_STRIDE = 7_919


@dataclasses.dataclass(frozen=True)
class Point:
  """One trace set: its sampling settings and a readable, unique name."""
  kind: str  # "ads", "temperature", "control" (the A/A control: temperature, stream 1),
  #            "poe" (product of experts, lam = gamma) or "aligned" (ADS, answer-aligned g)
  tau: float
  lam: float
  eps: float
  stream: int = 0  # sampling stream (seed offset): 0 for the grid, 1 for the control sweep

  @property
  def name(self) -> str:
    return f"{self.kind}_tau{self.tau:.4g}_lam{self.lam:.4g}"


@dataclasses.dataclass(frozen=True)
class Resample:
  """The teacher's answers to the resampling attacker's re-queries of a point's degenerate
  traces (`attacks.resampled`): round r samples at stream RESAMPLE_STREAM + r - 1."""
  point: Point

  @property
  def name(self) -> str:
    return f"{self.point.name}+resample"


RESAMPLE_STREAM = 2  # round 1's sampling stream (stream 1 is the A/A control's)


def gradient_of(kind: str) -> str:
  """The g a point kind's ADS ascends: "aligned" (the answer-aligned g) for kind "aligned",
  else "standard" (for kinds without g, the one they would take)."""
  return "aligned" if kind == "aligned" else "standard"


def kind_of(which: str) -> str:
  """The ADS point kind that ascends g `which` ("standard" or "aligned")."""
  return "aligned" if which == "aligned" else "ads"


@dataclasses.dataclass(frozen=True)
class Prefill:
  """A point's trace set sampled with the prefill attacker's text as every response's start."""
  point: Point

  @property
  def name(self) -> str:
    return f"{self.point.name}+prefill"


@dataclasses.dataclass(frozen=True)
class Student:
  """One distilled student: a point's traces, what an attacker makes of them (None: the
  traces as they are), and its replicate (distillation seed; 0 is the first)."""
  point: Point
  attack: str | None = None
  replicate: int = 0

  @property
  def entry(self) -> str:
    """The (point, attacker) it belongs to in the report: replicates share it."""
    return self.point.name if self.attack is None else f"{self.point.name}+{self.attack}"

  @property
  def name(self) -> str:
    return self.entry + (f"_r{self.replicate}" if self.replicate else "")


def grid(config, lams: Sequence[float] | None = None,
         aligned_lams: Sequence[float] | None = None) -> list[Point]:
  """Every point of the config's grid, in order; `lams` (the calibrated ones) replaces
  ads_lam_over_eps * eps when given, and `aligned_lams` (the answer-aligned ADS's own
  calibration) replaces `lams` for the kind "aligned"."""
  g = config.grid
  eps = float(config.sample.eps)
  if lams is None:
    lams = [float(b) * eps for b in g.ads_lam_over_eps]
  # lam = 0 is plain sampling whichever sweep lists it: one trace set, named as a temperature.
  kind = lambda lam: "ads" if lam else "temperature"
  points = [Point(kind(float(lam)), float(t), float(lam), eps) for t in g.ads_taus
            for lam in lams]
  points += [Point("temperature", float(t), 0.0, eps) for t in g.temperatures]
  points += [Point("control", float(t), 0.0, eps, stream=1) for t in g.controls]
  points += [Point("poe" if gamma else "temperature", float(t), float(gamma), eps)
             for t in g.poe_taus for gamma in g.poe_gammas]
  if g.aligned:  # ADS with the answer-aligned g at the ADS taus, at its own lams
    points += [Point("aligned", float(t), float(lam), eps) for t in g.ads_taus
               for lam in (lams if aligned_lams is None else aligned_lams) if lam]
  return list(dict.fromkeys(points))  # the same settings twice are one trace set


def shard_points(points: Sequence, shard: tuple[int, int]) -> list:
  i, n = shard
  if not 0 <= i < n:
    raise errors.BadValue(f"--shard={i}/{n}: expected i/n with 0 <= i < n (host i of n), "
                          "e.g. --shard=0/4.")
  return [p for k, p in enumerate(points) if k % n == i]


def parse_shard(text: str) -> tuple[int, int]:
  """--shard=i/n as (i, n), 0 <= i < n; errors.BadValue otherwise."""
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise errors.BadValue(f"--shard={text}: expected i/n with 0 <= i < n (host i of n), "
                          "e.g. --shard=0/4.") from None
  shard_points([], (i, n))
  return i, n


def calibration_span(temperature_accuracy: dict[float, float], between: Sequence[float]
                     ) -> tuple[float, float]:
  """(best, worst) teacher accuracy the ADS lams are aimed between: over the whole
  temperature sweep, or over the taus in `between` (grid.calibrate.between), which keeps the
  ADS points inside a wider sweep so that none falls off the end of the curve it is matched
  against."""
  accs = ([temperature_accuracy[float(t)] for t in between] if between
          else list(temperature_accuracy.values()))
  return max(accs), min(accs)


def calibrated_lams(ladder: Sequence[tuple[float, float]], best: float, worst: float,
                    points: int) -> list[float]:
  """`points` lams at which the teacher's accuracy is expected to be evenly spaced from `best`
  down to `worst` (both included), read off a measured (lam, accuracy) ladder; duplicates
  merge, so fewer may come back.

  The ladder's accuracies are made non-increasing in lam (a running minimum: noise on a small
  batch) and interpolated linearly in log lam between its rungs (lam = 0 sits one rung below
  the smallest positive lam). A target above the ladder's first accuracy gets the smallest
  positive lam; one below its last gets the largest lam (the ladder is too short: extend it)."""
  ladder = sorted((float(lam), float(acc)) for lam, acc in ladder)
  positive = [lam for lam, _ in ladder if lam > 0]
  if len(positive) < 2:
    raise errors.BadValue("a calibration ladder needs at least two positive lams "
                          "(grid.calibrate.ladder).")
  floor = math.log(positive[0]) - (math.log(positive[1]) - math.log(positive[0]))
  xs = [math.log(lam) if lam > 0 else floor for lam, _ in ladder]
  ys, low = [], math.inf
  for _, acc in ladder:
    low = min(low, acc)
    ys.append(low)
  targets = ([best + (worst - best) * k / (points - 1) for k in range(points)] if points > 1
             else [(best + worst) / 2])
  lams = []
  for target in targets:
    if target >= ys[0]:
      x = xs[0] if ladder[0][0] > 0 else math.log(positive[0])
    elif target <= ys[-1]:
      x = xs[-1]
    else:
      k = next(i for i in range(1, len(ys)) if ys[i] <= target)
      span = ys[k - 1] - ys[k]
      x = xs[k] if span == 0 else xs[k - 1] + (xs[k] - xs[k - 1]) * (ys[k - 1] - target) / span
    lams.append(float(f"{max(math.exp(x), positive[0]):.3g}"))
  return sorted(set(lams))
