"""The defence x attacker matrix of a study (configs/matrix.py): per defence and strength, per
attacker, the students' accuracy minus the temperature students' under the same attacker at
the same teacher accuracy, with a 95% t interval over seeds; the teacher's cost per token; a
heat map and the teacher-vs-student frontier per attacker.

Reads each finished chain's report/results.json (`report.write_report`): `matched` holds the
passive students' rows (attacker "none"), `attacks` the attacked ones (`report.attack_rows`:
filters are matched against temperature students filtered alike). A cell's value per seed is
the mean gap over its points (None unless every point has one); a row per strength ranks a
defence's points by lam (ADS, aligned), gamma (poe) or tau (the A/A control) in each seed.

  cells = matrix_cells([seed_cells(r) for r in per_seed])  # [{kind, rank, attack, summary, ...}]
  decisions(cells, seeds, planned, secondary)   # the plan's outcome per defence and attacker
  write_matrix_report(per_seed, out, planned)   # matrix.md, matrix.json, heatmap.png, frontier.png
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from etils import epath

from antidistill_jax import files, stats

KINDS = ("ads", "aligned", "poe", "control")  # defences, then the A/A control
TITLES = dict(ads="ADS", aligned="ADS, answer-aligned g", poe="product of experts",
              control="A/A control (plain, other seeds)")
STRENGTH = dict(ads="lam", aligned="lam", poe="gamma", control="tau")
NONE = "none"  # the passive student: no attacker


def _columns(attacks) -> list[str]:
  """The attackers in column order: passive first, then by name."""
  return sorted(set(attacks), key=lambda a: (a != NONE, a))


def _strength(row: dict) -> float:
  return row["tau"] if row["kind"] == "control" else row["lam"]


def seed_cells(results: dict) -> dict[tuple[str, int, str], dict]:
  """{(kind, rank, attack): dict(gap, teacher, student, strength)} of one chain's results;
  rank 0 is the mean over the kind's points (complete: None if one lacks a gap)."""
  rows = [dict(r, attack=NONE) for r in results.get("matched") or []]
  rows += [r for r in results.get("attacks") or [] if r.get("kind", "ads") in KINDS]
  out = {}
  for kind in KINDS:
    for attack in sorted({r["attack"] for r in rows}):
      mine = sorted((r for r in rows if r.get("kind", "ads") == kind and r["attack"] == attack),
                    key=_strength)
      if not mine:
        continue
      for k, r in enumerate(mine, 1):
        out[(kind, k, attack)] = dict(gap=r["gap"], teacher=r["teacher"],
                                      student=r["ads_student"], strength=_strength(r),
                                      temperature_student=r["temperature_student"])
      gaps = [r["gap"] for r in mine]
      out[(kind, 0, attack)] = dict(
          gap=None if None in gaps else sum(gaps) / len(gaps),
          teacher=float(np.mean([r["teacher"] for r in mine])), student=None, strength=None)
  return out


def matrix_cells(per_seed: Sequence[dict]) -> list[dict]:
  """Every (kind, rank, attack) over the seeds' seed_cells: the gap's summary
  (stats.summarize: mean, 95% t CI, p, n) and the mean teacher accuracy and strength."""
  keys = sorted({k for cells in per_seed for k in cells},
                key=lambda k: (KINDS.index(k[0]), k[1], k[2] != NONE, k[2]))
  out = []
  for kind, rank, attack in keys:
    values = [c.get((kind, rank, attack)) for c in per_seed]
    present = [v for v in values if v is not None]
    strengths = [v["strength"] for v in present if v["strength"] is not None]
    out.append(dict(kind=kind, rank=rank, attack=attack,
                    summary=stats.summarize([v["gap"] if v else None for v in values]),
                    teacher=float(np.mean([v["teacher"] for v in present])),
                    strength=float(np.mean(strengths)) if strengths else None,
                    seeds=len(present)))
  return out


COST_FILE = "cost.json"  # bench/defences.py --out=<the matrix's folder>/cost.json


def read_cost(out) -> tuple[dict[str, float], str]:
  """({kind: the teacher's seconds per served token over plain sampling's}, where it was
  measured) from `out`/cost.json, written by bench/defences.py (interleaved rounds on one
  machine); ({}, "") when it is absent. The trace sets' own timings are not used: a long study
  samples them hours apart under other loads (3x apart for one program, measured)."""
  path = epath.Path(out) / COST_FILE
  if not path.exists():
    return {}, ""
  bench = files.read_json(path)
  where = (f"{bench['device']} ({bench['platform']}), {bench['config']} seed {bench['seed']}, "
           f"{bench['prompts']} prompts per point, best of {bench['repeats']} interleaved rounds")
  return {k: float(v["ratio"]) for k, v in bench["kinds"].items()}, where


def _row_label(c: dict) -> str:
  if c["rank"] == 0:
    return f"{TITLES[c['kind']]}, mean over its points"
  s = "-" if c["strength"] is None else f"{c['strength']:.3g}"
  return f"{TITLES[c['kind']]} {c['rank']} ({STRENGTH[c['kind']]} ~ {s})"


def _cell_text(c: dict | None, seeds: int) -> str:
  """"gap [CI]" in points, with its seed count where it has fewer than its row."""
  if c is None or c["summary"]["mean"] is None:
    return "-"
  s = c["summary"]
  ci = "" if s["ci"] is None else f" [{100 * s['ci'][0]:+.1f}, {100 * s['ci'][1]:+.1f}]"
  return f"{100 * s['mean']:+.1f}{ci}" + (f" (n={s['n']})" if s["n"] < seeds else "")


def temperature_students(per_seed_points: Sequence[list[dict]]) -> dict[str, float]:
  """{attack: the temperature students' mean accuracy under it}: per seed the mean over the
  sweep's points, then the mean over seeds (the seeds that have the attacker's temperature
  students; an attacker not applied to temperature sets, like clean_mix, has none)."""
  per_attack: dict[str, list[float]] = {}
  for rows in per_seed_points:
    by: dict[str, list[float]] = {}
    for r in rows:
      if r["kind"] == "temperature":
        by.setdefault(r["attack"], []).append(r["student"])
    for attack, accs in by.items():
      per_attack.setdefault(attack, []).append(float(np.mean(accs)))
  return {a: float(np.mean(v)) for a, v in per_attack.items()}


def weight_shares(per_seed: Sequence[dict]) -> dict[str, float]:
  """{attack: the share of the weight its most-weighted fifth of traces held, mean over every
  attacked set of every seed} for the reweighting attackers (attacked_points' top20_mass;
  1/5 is unweighted SFT)."""
  shares: dict[str, list[float]] = {}
  for results in per_seed:
    for p in results.get("attacked_points") or []:
      if p.get("top20_mass") is not None:
        shares.setdefault(p["attack"], []).append(float(p["top20_mass"]))
  return {a: float(np.mean(v)) for a, v in shares.items()}


def table(cells: Sequence[dict], cost: dict[str, float],
          baseline: dict[str, float] | None = None,
          shares: dict[str, float] | None = None) -> str:
  """Rows: defence and strength (teacher accuracy, cost per token); columns: attackers. First
  row, where `baseline` (temperature_students) is given: the temperature students' own
  accuracy under each attacker, the level every gap below is measured from; then, where
  `shares` (weight_shares) is given, the reweighting attackers' weight concentration."""
  attacks = _columns(c["attack"] for c in cells)
  rows = sorted({(c["kind"], c["rank"]) for c in cells},
                key=lambda r: (KINDS.index(r[0]), r[1]))
  at = {(c["kind"], c["rank"], c["attack"]): c for c in cells}
  lines = ["| defence | teacher acc | cost per token | seeds | "
           + " | ".join(a if a != NONE else "passive" for a in attacks) + " |",
           "|---|---:|---:|---:|" + "---|" * len(attacks)]
  if baseline:
    lines.append("| temperature students' accuracy (absolute, mean over the sweep) | - | 1.00x | "
                 f"{max(c['summary']['n'] for c in cells)} | "
                 + " | ".join("-" if a not in baseline else f"{100 * baseline[a]:.1f}%"
                              for a in attacks) + " |")
  if shares:
    lines.append("| reweighting: the most-weighted fifth's share of the weight (0.20: none) | - "
                 "| - | - | " + " | ".join("-" if a not in shares else f"{shares[a]:.2f}"
                                          for a in attacks) + " |")
  for kind, rank in rows:
    first = next(at[(kind, rank, a)] for a in attacks if (kind, rank, a) in at)
    c = cost.get(kind)
    seeds = max(at[(kind, rank, a)]["summary"]["n"] for a in attacks if (kind, rank, a) in at)
    lines.append(f"| {_row_label(first)} | {first['teacher']:.3f} | "
                 f"{'-' if c is None else f'{c:.2f}x'} | {seeds} | "
                 + " | ".join(_cell_text(at.get((kind, rank, a)), seeds) for a in attacks)
                 + " |")
  return "\n".join(lines) + "\n"


def heatmap(cells: Sequence[dict], path, planned: int | None = None) -> bool:
  """Mean gap per (defence row, attacker), each cell printed with its CI; a cell whose CI
  excludes 0 is framed; the title says "interim" below `planned` seeds. False when there is
  nothing to draw."""
  drawn = [c for c in cells if c["summary"]["mean"] is not None]
  if not drawn:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from antidistill_jax import report
  attacks = _columns(c["attack"] for c in drawn)
  rows = sorted({(c["kind"], c["rank"]) for c in drawn}, key=lambda r: (KINDS.index(r[0]), r[1]))
  at = {(c["kind"], c["rank"], c["attack"]): c for c in drawn}
  grid = np.full((len(rows), len(attacks)), np.nan)
  for i, (kind, rank) in enumerate(rows):
    for j, a in enumerate(attacks):
      if (kind, rank, a) in at:
        grid[i, j] = 100 * at[(kind, rank, a)]["summary"]["mean"]
  span = 1.5 * max(float(np.nanmax(np.abs(grid))), 1.0)  # no cell darker than 2/3 of the scale
  fig, ax = plt.subplots(figsize=(max(1.6 * len(attacks) + 4.0, 8.0), 0.55 * len(rows) + 1.8))
  ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
  for i, (kind, rank) in enumerate(rows):
    for j, a in enumerate(attacks):
      c = at.get((kind, rank, a))
      if c is None:
        continue
      s = c["summary"]
      ci = "" if s["ci"] is None else f"\n[{100 * s['ci'][0]:+.1f}, {100 * s['ci'][1]:+.1f}]"
      ax.text(j, i, f"{100 * s['mean']:+.1f}{ci}", ha="center", va="center", fontsize=7)
      if stats.excludes_zero(s["ci"]):
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=2))
  ax.set_xticks(range(len(attacks)))
  ax.set_xticklabels([a if a != NONE else "passive" for a in attacks], fontsize=8, rotation=20)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([_row_label(at[next((k, r, a) for a in attacks if (k, r, a) in at)])
                      for k, r in rows], fontsize=7)
  n = max(c["summary"]["n"] for c in drawn)
  ax.set_title("Student accuracy minus temperature students' at the same teacher accuracy\n"
               f"(points; 95% t CI over up to {_seeds_text(n, planned)})\n"
               "framed: CI excludes 0; red: students learned less", fontsize=8)
  fig.tight_layout()
  report._save_png(fig, path)
  plt.close(fig)
  return True


def frontier(per_seed_points: Sequence[list[dict]], path) -> bool:
  """Teacher against student accuracy per attacker (one panel each), each point the mean over
  seeds of its rank's values, by kind; the temperature curve drawn as a solid line,
  each defence's points joined by a dotted one; up to 4 panels a row."""
  series: dict[str, dict[tuple[str, int], list[tuple[float, float]]]] = {}
  for rows in per_seed_points:
    for r in rows:
      series.setdefault(r["attack"], {}).setdefault((r["kind"], r["rank"]), []).append(
          (r["student"], r["teacher"]))
  if not series:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from antidistill_jax import report
  attacks = _columns(series)
  cols = min(len(attacks), 4)
  n_rows = -(-len(attacks) // cols)
  fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 3.4 * n_rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(attacks):]:
    ax.set_visible(False)
  colors = dict(temperature="tab:blue", ads="tab:red", aligned="tab:purple", poe="tab:green",
                control="tab:gray")
  for ax, attack in zip(axes.flat, attacks):
    for kind, color in colors.items():
      pts = sorted(((np.mean([s for s, _ in v]), np.mean([t for _, t in v]))
                    for (k, _), v in series[attack].items() if k == kind), key=lambda p: p[1])
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "-" if kind == "temperature" else ":", marker="o", color=color,
                label=kind, markersize=4)
    ax.set_title(attack if attack != NONE else "passive", fontsize=9)
    ax.set_xlabel("student accuracy", fontsize=8)
  for row in axes:
    row[0].set_ylabel("teacher accuracy", fontsize=8)
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("Teacher vs student accuracy per attacker (means over "
               f"{_seeds_text(len(per_seed_points))}; temperature: the solid curve)", fontsize=9)
  fig.tight_layout()
  report._save_png(fig, path)
  plt.close(fig)
  return True


def frontier_rows(results: dict) -> list[dict]:
  """(kind, rank, attack, teacher, student) of every point of one chain, the passive students'
  (`points`) and each attacker's (`attacked_points`), temperature points included; rank: the
  point's place by strength among its kind's under that attacker in this chain."""
  points = [dict(attack=NONE, kind=e["point"]["kind"], tau=e["point"]["tau"],
                 lam=e["point"]["lam"], teacher=(e.get("teacher_eval") or {}).get("accuracy"),
                 student=(e.get("student_eval") or {}).get("accuracy"))
            for e in results.get("points") or []]
  points += list(results.get("attacked_points") or [])
  points = [p for p in points if p["teacher"] is not None and p["student"] is not None]
  out = []
  for key in sorted({(p["attack"], p["kind"]) for p in points}):
    mine = sorted((p for p in points if (p["attack"], p["kind"]) == key),
                  key=lambda p: p["tau"] if p["kind"] in ("control", "temperature") else p["lam"])
    out += [dict(attack=key[0], kind=key[1], rank=k, teacher=p["teacher"], student=p["student"])
            for k, p in enumerate(mine, 1)]
  return out


DEFENCES = ("ads", "aligned", "poe")  # the kinds whose mean rows the plan decides
DECLARED = ("survives", "helps the student")


def outcome(s: dict, passive: dict | None = None) -> str:
  """The plan's rule (docs/matrix/PLAN.md, "Primary cells and decisions") for a cell with
  summary `s`; `passive`: the same defence's passive cell, for an attacked one. "survives":
  the 95% CI lies below 0; "helps the student": above 0; "broken": the CI contains 0 and
  lies wholly above a negative passive gap (the attacker undid what the defence did to passive
  students); "not shown to survive": the CI contains 0 and the passive gap, or the passive gap
  is not negative; "too few seeds": no interval."""
  if s["ci"] is None:
    return "too few seeds"
  lo, hi = s["ci"]
  if hi < 0:
    return "survives"
  if lo > 0:
    return "helps the student"
  if passive is not None and passive["mean"] is not None and passive["mean"] < 0 \
      and lo > passive["mean"]:
    return "broken"
  return "not shown to survive"


def decisions(cells: Sequence[dict], seeds: int, planned: int | None = None,
              secondary: Sequence[str] = ()) -> dict:
  """The plan's decisions on the defences' mean rows (rank 0 of DEFENCES), one per attacker:
  {cells: [{kind, attack, outcome, primary}], primary_cells, declared (primary cells that
  survive or help), expected_by_chance and chance_of_any (that many tests at stats.ALPHA with
  no effect anywhere), control (the A/A row's passive summary), control_biased (its CI excludes
  0: no cell is a finding), interim (fewer seeds than planned)}. Attackers in `secondary` are
  decided alike and not counted."""
  at = {(c["kind"], c["rank"], c["attack"]): c for c in cells}
  attacks = _columns(c["attack"] for c in cells)
  out = []
  for kind in DEFENCES:
    passive = at.get((kind, 0, NONE))
    for attack in attacks:
      c = at.get((kind, 0, attack))
      if c is not None:
        out.append(dict(kind=kind, attack=attack, primary=attack not in secondary,
                        outcome=outcome(c["summary"], None if attack == NONE or passive is None
                                        else passive["summary"])))
  primary = [c for c in out if c["primary"]]
  control = at.get(("control", 0, NONE))
  control = control and control["summary"]
  biased = control is not None and stats.excludes_zero(control["ci"])
  return dict(cells=out, primary_cells=len(primary),
              declared=sum(c["outcome"] in DECLARED for c in primary),
              expected_by_chance=len(primary) * stats.ALPHA,
              chance_of_any=1 - (1 - stats.ALPHA) ** len(primary), control=control,
              control_biased=biased, seeds=seeds, planned=planned,
              interim=planned is not None and seeds < planned)


def decisions_text(d: dict) -> str:
  """The decisions as a defence x attacker table of outcomes, the tally against chance and the
  A/A check."""
  attacks = list(dict.fromkeys(c["attack"] for c in d["cells"]))
  kinds = list(dict.fromkeys(c["kind"] for c in d["cells"]))
  at = {(c["kind"], c["attack"]): c for c in d["cells"]}
  secondary = {c["attack"] for c in d["cells"] if not c["primary"]}
  head = ("\n## The plan's decisions (docs/matrix/PLAN.md)\n\n"
          + (f"**Interim, {d['seeds']} of {d['planned']} seeds: no cell is a finding before "
             f"{d['planned']}; looking early raises the chance of a false one.** So far:\n\n"
             if d["interim"] else ""))
  lines = ["| defence (mean over its points) | "
           + " | ".join(("passive" if a == NONE else a)
                        + (" (secondary)" if a in secondary else "") for a in attacks) + " |",
           "|---|" + "---|" * len(attacks)]
  for kind in kinds:
    lines.append(f"| {TITLES[kind]} | " + " | ".join(
        at[(kind, a)]["outcome"] if (kind, a) in at else "-" for a in attacks) + " |")
  c = d["control"]
  if c is None or c["ci"] is None:
    check = "too few seeds for an interval: the matching is unchecked, no cell is a finding."
  else:
    ci = f"{100 * c['mean']:+.1f} [{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}]"
    check = (f"{ci}: its interval excludes 0, the matching is biased and no cell above is a "
             "finding." if d["control_biased"] else f"{ci}: consistent with 0.")
  tail = ("\nsurvives: the cell's 95% CI lies below 0; helps the student: above 0; broken: "
          "the CI contains 0 and lies above the defence's negative passive gap (the attacker "
          "undid what the defence did); not shown to survive: neither (no evidence either way); "
          f"too few seeds: no interval.\n\nDeclared (survives or helps): {d['declared']} of "
          f"{d['primary_cells']} primary cells; if no defence did anything, "
          f"{d['expected_by_chance']:.2f} would be declared by chance "
          f"({100 * d['chance_of_any']:.0f}% chance of at least one)"
          + (f"; secondary columns ({', '.join(sorted(secondary))}) not counted" if secondary
             else "") + f".\n\nA/A control (passive): {check}\n")
  return head + "\n".join(lines) + "\n" + tail


def _seeds_text(n: int, planned: int | None = None) -> str:
  """"1 seed", "3 seeds", or "2 of 4 seeds (interim: ...)" when fewer than planned."""
  if planned is not None and n < planned:
    return (f"{n} of {planned} seeds (interim: the plan decides at {planned}; a cell from "
            "fewer seeds is no finding)")
  return f"{n} seed" + ("" if n == 1 else "s")


def write_matrix_report(per_seed: Sequence[dict], out, planned: int | None = None,
                        secondary: Sequence[str] = ()) -> dict:
  """matrix.md, matrix.json, heatmap.png and frontier.png in `out` from the chains' results
  (report/results.json of each finished chain), with the teacher's cost from `out`/cost.json
  where bench/defences.py wrote one. planned: the seeds the study will have (the text says
  "interim" below it); secondary: attackers whose cells the decisions do not count."""
  out = epath.Path(out)
  files.makedirs(out)
  cells = matrix_cells([seed_cells(r) for r in per_seed])
  points = [frontier_rows(r) for r in per_seed]
  baseline, shares = temperature_students(points), weight_shares(per_seed)
  cost, where = read_cost(out)
  measured = (f"measured by bench/defences.py on {where}" if cost else
              f"not measured (python bench/defences.py --out={os.fspath(out / COST_FILE)})")
  text = ["# Defences x attackers\n\n",
          f"{_seeds_text(len(per_seed), planned)}. Each cell: the students' mean accuracy "
          "minus the temperature students' under the same attacker, interpolated at the "
          "defence's teacher accuracy (points; negative: the defence kept the students from "
          "learning), mean over seeds with its 95% t interval. Cost per token: the teacher's "
          "sampling seconds per served token at the defence over plain sampling's, "
          f"{measured}. The first row is the "
          "temperature students' own accuracy under each attacker (\"-\": it is not applied to "
          "temperature sets, and its cells are measured from the passive ones): a gap is "
          "read against it, and an attacker whose own students learn little is a weak one.\n\n",
          table(cells, cost, baseline, shares)]
  decided = decisions(cells, len(per_seed), planned, secondary)
  text.append(decisions_text(decided))
  files.write_atomic(out / "matrix.md", "".join(text).encode("utf-8"))
  files.write_json(out / "matrix.json", dict(cells=cells, cost=cost, seeds=len(per_seed),
                                             planned=planned, temperature_students=baseline,
                                             weight_shares=shares, decisions=decided))
  written = dict(table=os.fspath(out / "matrix.md"))
  if heatmap(cells, out / "heatmap.png", planned):
    written["heatmap"] = os.fspath(out / "heatmap.png")
  if frontier(points, out / "frontier.png"):
    written["frontier"] = os.fspath(out / "frontier.png")
  return written
