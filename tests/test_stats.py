"""antidistill_jax.stats: the study's intervals, test and detectable effect, against textbook
values and against their promise (95% coverage under the null)."""

import numpy as np
import pytest

from antidistill_jax import stats


def test_summary_of_five_values_matches_the_textbook():
  s = stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
  assert s["n"] == 5 and s["mean"] == 3.0 and s["sd"] == pytest.approx(1.5811388, rel=1e-6)
  # t_{0.975, 4} = 2.776445, t_{0.8, 4} = 0.940965 (tables); se = sd / sqrt(5) = 0.7071068
  assert s["ci"] == pytest.approx((3 - 2.776445 * 0.7071068, 3 + 2.776445 * 0.7071068), rel=1e-5)
  assert s["mde"] == pytest.approx((2.776445 + 0.940965) * 0.7071068, rel=1e-5)
  assert s["p"] == pytest.approx(0.013236, rel=1e-3)  # t = 4.2426 on 4 df, two-sided
  lo, hi = s["bootstrap_ci"]
  assert 1.0 <= lo < 3.0 < hi <= 5.0


def test_missing_values_are_dropped_and_counted():
  s = stats.summarize([0.1, None, 0.3, float("nan")])
  assert s["n"] == 2 and s["mean"] == pytest.approx(0.2)
  one = stats.summarize([0.4, None])
  assert one["n"] == 1 and one["mean"] == 0.4 and one["ci"] is None and one["mde"] is None
  assert stats.summarize([])["mean"] is None
  assert stats.fmt_summary(stats.summarize([])) == "-"


def test_the_t_interval_covers_a_zero_mean_95_percent_of_the_time_at_eight_seeds():
  """Under the null (A/A), 8 seeds: the interval covers 0 in ~95% of studies and the test
  rejects in ~5%. A z interval (1.96) would cover ~91%: the t quantile matters at this n."""
  rng = np.random.default_rng(0)
  studies = [stats.summarize(list(rng.normal(0.0, 0.1, 8)), resamples=0) for _ in range(3000)]
  covered = np.mean([s["ci"][0] <= 0.0 <= s["ci"][1] for s in studies])
  rejected = np.mean([s["p"] < 0.05 for s in studies])
  assert 0.935 <= covered <= 0.965 and 0.035 <= rejected <= 0.065
  assert covered == pytest.approx(1 - rejected)  # the interval and the test agree


def test_the_detectable_effect_is_detected_80_percent_of_the_time():
  rng = np.random.default_rng(1)
  effect = stats.mde(0.1, 8)
  hits = np.mean([stats.summarize(list(rng.normal(effect, 0.1, 8)), resamples=0)["p"] < 0.05
                  for _ in range(3000)])
  assert 0.76 <= hits <= 0.84
