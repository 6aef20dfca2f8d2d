"""The defence x attacker matrix: each cell is the mean over seeds of the per-seed gap (a
kind's points averaged, None when one lacks a gap), with the study's t interval; ranks follow
each defence's strength; the report writes its table, heat map and frontier."""

import numpy as np
import pytest

from antidistill_jax import matrix, stats


def row(kind, lam, gap, teacher=0.8, student=0.5, tau=1.0, attack=None):
  r = dict(kind=kind, lam=lam, tau=tau, gap=gap, teacher=teacher, ads_student=student,
           temperature_student=None if gap is None else student - gap, name=f"{kind}{lam}")
  if attack:
    r["attack"] = attack
  return r


def chain(seed_gaps):
  """One chain's results: ADS at two lams (the larger listed first), poe at one gamma, the
  control at one tau, each passive and under reweight."""
  a1, a2, p, c, ra1, ra2 = seed_gaps
  matched = [row("ads", 0.4, a2), row("ads", 0.2, a1), row("poe", 0.6, p),
             row("control", 0.0, c, tau=1.3)]
  attacks = [row("ads", 0.2, ra1, attack="reweight"), row("ads", 0.4, ra2, attack="reweight")]
  points = [dict(point=dict(kind="temperature", tau=t, lam=0.0), teacher_eval=dict(accuracy=acc),
                 student_eval=dict(accuracy=0.5)) for t, acc in ((1.0, 0.9), (1.6, 0.6))]
  attacked_points = [dict(attack="reweight", kind="temperature", tau=1.0, lam=0.0, teacher=0.9,
                          student=0.55, beta=0.5, top20_mass=0.9)]
  return dict(matched=matched, attacks=attacks, points=points, attacked_points=attacked_points)


SEEDS = [(-0.02, -0.06, 0.01, 0.00, -0.01, -0.03),
         (-0.04, -0.10, 0.03, 0.01, 0.00, None),
         (0.00, -0.02, -0.01, -0.01, -0.02, -0.05)]


def test_cells_are_seed_means_of_kind_means_with_the_study_interval():
  per_seed = [matrix.seed_cells(chain(g)) for g in SEEDS]
  assert per_seed[0][("ads", 1, "none")]["strength"] == 0.2  # ranked by lam, not listed order
  assert per_seed[0][("ads", 2, "none")]["gap"] == -0.06
  cells = {(c["kind"], c["rank"], c["attack"]): c for c in matrix.matrix_cells(per_seed)}
  ads = cells[("ads", 0, "none")]
  expected = [(g[0] + g[1]) / 2 for g in SEEDS]
  assert ads["summary"] == stats.summarize(expected) and ads["summary"]["n"] == 3
  np.testing.assert_allclose(ads["summary"]["mean"], np.mean(expected))
  # A seed where one point lacks a gap gives the kind's mean no value there: n drops.
  attacked = cells[("ads", 0, "reweight")]["summary"]
  assert attacked["n"] == 2
  assert attacked["mean"] == pytest.approx(np.mean([-0.02, -0.035]))
  assert cells[("ads", 2, "reweight")]["summary"]["n"] == 2
  assert cells[("poe", 1, "none")]["strength"] == pytest.approx(0.6)
  assert cells[("control", 1, "none")]["strength"] == pytest.approx(1.3)
  order = [(c["kind"], c["rank"], c["attack"]) for c in matrix.matrix_cells(per_seed)]
  assert order.index(("ads", 0, "none")) < order.index(("ads", 0, "reweight")) < \
      order.index(("poe", 0, "none")) < order.index(("control", 0, "none"))


def test_the_report_writes_its_table_heat_map_and_frontier(tmp_path, monkeypatch):
  written = matrix.write_matrix_report([chain(g) for g in SEEDS], tmp_path)
  assert set(written) == {"table", "heatmap", "frontier"}
  text = (tmp_path / "matrix.md").read_text()
  assert "| passive | reweight |" in text
  mean = np.mean([(g[0] + g[1]) / 2 for g in SEEDS])
  ci = stats.summarize([(g[0] + g[1]) / 2 for g in SEEDS])["ci"]
  assert f"| ADS, mean over its points | 0.800 | - | 3 | {100 * mean:+.1f} " \
         f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] |" in text
  assert "not measured (python bench/defences.py" in text
  assert text.count("3 seeds. Each cell") == 1 and "interim" not in text
  # The temperature students' own level under each attacker: passive 0.5 at both points;
  # reweight's one attacked point 0.55.
  assert "| temperature students' accuracy (absolute, mean over the sweep) | - | 1.00x | 3 | " \
         "50.0% | 55.0% |" in text
  assert "| reweighting: the most-weighted fifth's share of the weight (0.20: none) | - | - | " \
         "- | - | 0.90 |" in text
  # Fewer seeds than the study plans: the table and the heat map's title say it is interim.
  from antidistill_jax import report
  titles = []
  monkeypatch.setattr(report, "_save_png", lambda fig, path: titles.append(
      fig.axes[0].get_title()))
  matrix.write_matrix_report([chain(g) for g in SEEDS[:2]], tmp_path, planned=4)
  assert "2 of 4 seeds (interim: the plan decides at 4;" in (tmp_path / "matrix.md").read_text()
  assert "up to 2 of 4 seeds (interim: the plan decides at 4;" in titles[0]
  monkeypatch.undo()
  # bench/defences.py's cost.json in the folder: the cost column reads it.
  import json
  (tmp_path / "cost.json").write_text(json.dumps(dict(
      device="cpu", platform="cpu", config="matrix.py:matrix", seed=0, prompts=8, repeats=1,
      kinds=dict(temperature=dict(ratio=1.0), ads=dict(ratio=2.25), poe=dict(ratio=1.5)))))
  text = open(matrix.write_matrix_report([chain(g) for g in SEEDS], tmp_path)["table"]).read()
  assert "| ADS, mean over its points | 0.800 | 2.25x | 3 |" in text
  assert "measured by bench/defences.py on cpu (cpu), matrix.py:matrix seed 0" in text
  # ranked by tau within (attacker, kind), counted from 1; teacher and student as measured
  assert matrix.frontier_rows(chain(SEEDS[0])) == [
      dict(attack="none", kind="temperature", rank=1, teacher=0.9, student=0.5),
      dict(attack="none", kind="temperature", rank=2, teacher=0.6, student=0.5),
      dict(attack="reweight", kind="temperature", rank=1, teacher=0.9, student=0.55)]


def test_temperature_students_average_each_seeds_sweep_then_the_seeds():
  t = lambda attack, acc: dict(attack=attack, kind="temperature", rank=1, teacher=0.8,
                               student=acc)
  a = [t("none", 0.2), t("none", 0.4), dict(t("none", 0.99), kind="ads")]
  b = [t("none", 0.9), t("keep_correct", 0.7)]
  # Seed a's sweep 0.3, seed b's 0.9: 0.6 (pooling the points would give 0.5); an attacker
  # one seed has is averaged over that seed only; a defence's students are not counted.
  assert matrix.temperature_students([a, b]) == pytest.approx(
      {"none": 0.6, "keep_correct": 0.7})


def decided_chain(gaps):
  """One chain's results with one point per kind: gaps {(kind, attack): gap}."""
  tau = lambda kind: 1.3 if kind == "control" else 1.0
  return dict(matched=[row(k, 0.1, g, tau=tau(k)) for (k, a), g in gaps.items() if a == "none"],
              attacks=[row(k, 0.1, g, attack=a) for (k, a), g in gaps.items() if a != "none"])


DECIDED = {("ads", "none"): (-0.30, -0.25, -0.35, -0.28),  # CI below 0: survives
           ("ads", "reweight"): (0.02, -0.03, 0.01, -0.01),  # CI around 0, above -0.295: broken
           ("ads", "reweight_mass"): (-0.30, -0.20, -0.25, -0.22),  # survives, secondary
           ("aligned", "none"): (-0.10, 0.10, -0.05, 0.02),  # CI around 0: not shown
           ("aligned", "reweight"): (-0.20, 0.15, -0.10, 0.05),  # CI holds 0 and the passive gap
           ("poe", "none"): (0.05, 0.06, 0.04, 0.07),  # CI above 0: helps the student
           ("poe", "reweight"): (-0.10, 0.10, 0.00, 0.05),  # passive gap not negative: not shown
           ("control", "none"): (0.01, -0.01, 0.00, 0.02)}  # the A/A control, consistent with 0


def per_seed_results(table, seeds=4):
  return [decided_chain({k: v[s] for k, v in table.items()}) for s in range(seeds)]


def test_the_plans_decisions_are_applied_to_the_mean_rows_and_tallied_against_chance(tmp_path):
  matrix.write_matrix_report(per_seed_results(DECIDED), tmp_path, planned=4,
                             secondary=("reweight_mass",))
  import json
  d = json.loads((tmp_path / "matrix.json").read_text())["decisions"]
  outcomes = {(c["kind"], c["attack"]): c["outcome"] for c in d["cells"]}
  assert outcomes == {
      ("ads", "none"): "survives", ("ads", "reweight"): "broken",
      ("ads", "reweight_mass"): "survives", ("aligned", "none"): "not shown to survive",
      ("aligned", "reweight"): "not shown to survive", ("poe", "none"): "helps the student",
      ("poe", "reweight"): "not shown to survive"}
  # 6 primary cells (3 defences x passive, reweight); the secondary one is not counted.
  assert (d["primary_cells"], d["declared"]) == (6, 2) and not d["interim"]
  assert d["expected_by_chance"] == pytest.approx(6 * stats.ALPHA)
  assert d["chance_of_any"] == pytest.approx(1 - (1 - stats.ALPHA) ** 6)
  assert not d["control_biased"]
  text = (tmp_path / "matrix.md").read_text()
  assert "| ADS | survives | broken | survives |" in text
  assert "reweight_mass (secondary)" in text and "Declared (survives or helps): 2 of 6" in text
  assert "A/A control (passive): +0.5 [" in text and "consistent with 0." in text
  assert "Interim" not in text
  # An A/A control whose interval excludes 0: the matching is biased, nothing is a finding.
  biased = {**DECIDED, ("control", "none"): (0.05, 0.06, 0.04, 0.05)}
  matrix.write_matrix_report(per_seed_results(biased), tmp_path, planned=4)
  text = (tmp_path / "matrix.md").read_text()
  assert "the matching is biased and no cell above is a finding" in text
  assert "Declared (survives or helps): 3 of 7" in text  # no secondary: reweight_mass counts
  for control in ((0.05, 0.06, 0.04, 0.05), (-0.05, -0.06, -0.04, -0.05)):  # either side
    cells = matrix.matrix_cells([matrix.seed_cells(r) for r in per_seed_results(
        {**DECIDED, ("control", "none"): control})])
    assert matrix.decisions(cells, 4, 4)["control_biased"]
  # Fewer seeds than planned: interim; one seed: no interval anywhere.
  matrix.write_matrix_report(per_seed_results(DECIDED, seeds=3), tmp_path, planned=4)
  assert "**Interim, 3 of 4 seeds" in (tmp_path / "matrix.md").read_text()
  one = matrix.decisions(matrix.matrix_cells(
      [matrix.seed_cells(r) for r in per_seed_results(DECIDED, seeds=1)]), 1, 4)
  assert {c["outcome"] for c in one["cells"]} == {"too few seeds"} and one["declared"] == 0
  assert "the matching is unchecked" in matrix.decisions_text(one)
