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
  # The resampled mean of {1..5} is exactly a mean of 5 draws: P(<= 1.6) = 0.018 and
  # P(<= 1.8) = 0.040 (enumerated), so its 2.5% and 97.5% points are 1.8 and 4.2, far enough
  # from the jumps that 10,000 resamples find them (alpha, not alpha / 2: 2.0 and 4.0).
  assert s["bootstrap_ci"] == pytest.approx((1.8, 4.2))


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


def test_one_runs_gap_interval_has_its_coverage_when_students_vary_as_stated():
  """report.run_gap: the CI of one run's mean gap from a given per-student SD. Students drawn
  around their trace sets' true accuracies with that SD (two students at the ADS points, one at
  the temperature points, a temperature point shared by two ADS points): the interval covers
  the true gap ~95% of the time, its standard error is the draws' SD, and a true gap of
  `mde` is detected ~80% of the time."""
  from antidistill_jax import report
  sd = 0.04
  temps = {0.9: 0.6, 0.7: 0.5, 0.5: 0.3}  # teacher accuracy: the temperature students' truth
  ads = {0.8: 0.55, 0.75: 0.525, 0.6: 0.4}  # on the temperature curve: no true gap
  truth = 0.0

  def entries(rng, shift=0.0):
    out = []
    for kind, points, r in (("temperature", temps, 1), ("ads", ads, 2)):
      for k, (t, acc) in enumerate(points.items()):
        student = acc + shift * (kind == "ads") + rng.normal(0, sd, r).mean()
        out.append(dict(name=f"{kind}{k}", point=dict(kind=kind, tau=1.0, lam=0.1 * k, eps=0.01),
                        teacher_eval=dict(accuracy=t),
                        student_eval=dict(accuracy=student, n_students=r)))
    return out

  rng = np.random.default_rng(0)
  gaps = [report.run_gap(report.matched(entries(rng)), sd) for _ in range(3000)]
  means = np.array([g["mean"] for g in gaps])
  se = gaps[0]["sd"]
  # Var / sd^2 = 3 / (9 * 2) + c^2 over the temperature points, c = (0.5+0.25, 0.5+0.75+0.5, 0.5) / 3
  assert se == pytest.approx(sd * np.sqrt(3 / 18 + (0.75 ** 2 + 1.75 ** 2 + 0.5 ** 2) / 9))
  assert np.std(means) == pytest.approx(se, rel=0.06)
  assert np.mean(means) == pytest.approx(truth, abs=0.003)
  covered = np.mean([g["ci"][0] <= truth <= g["ci"][1] for g in gaps])
  assert 0.935 <= covered <= 0.965
  mde = gaps[0]["mde"]
  hits = np.mean([report.run_gap(report.matched(entries(rng, shift=mde)), sd)["p"] < 0.05
                  for _ in range(2000)])
  assert 0.76 <= hits <= 0.84
  # A point outside the sweep (no gap) leaves the run without a primary value.
  lost = entries(rng)
  lost[-1]["teacher_eval"]["accuracy"] = 0.95
  assert report.run_gap(report.matched(lost), sd) is None
