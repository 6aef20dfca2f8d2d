"""A study: the experiment once per arm and seed (a chain: models, g, traces, students), all in
one workdir, then the study's report.

  python -m antidistill_jax.main --config=configs/synthetic_study.py --workdir=runs/study
  python -m antidistill_jax.main --config=configs/synthetic_study.py --workdir=runs/study \
      --shard=i/n          # n processes or hosts: chain k runs in the job with k % n == i

An arm is the config file's argument (`--config=FILE:ARM`); `study.arms` lists the arms a
study runs and `study.seeds` the seeds of each. Chain (arm, seed) is the arm's config with
`seed` set and `pipeline.name = "ARM/seedS"`, so its index and report go to
workdir/results/ARM/seedS/ while its stages share the workdir's records: two arms that differ
only in g reuse each other's models, temperature and control students. A rerun (or another
job) skips what is finished.

The report (`write_study_report`, into study.out): per arm, the primary metric per seed (the
ADS students' accuracy minus the temperature students' at the same teacher accuracy, averaged
over the ADS points; each point's accuracy is the mean of its R students), its mean over
seeds with a 95% t interval, a bootstrap interval, the paired test's p and the minimal
detectable effect at 80% power; the same for each ADS point, for the A/A control (a second
temperature sweep analysed as if it were a defence) and for the students' NLL on clean traces
g never saw. Also a forest plot and the per-seed table of every student.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from antidistill_jax import errors, files, report, stats
from antidistill_jax.data.synthetic import ROLES

Loader = Callable[[str], ml_collections.ConfigDict]  # arm -> that arm's config


@dataclasses.dataclass(frozen=True)
class Chain:
  arm: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.arm}/seed{self.seed}"


def chains(config) -> list[Chain]:
  """Every (arm, seed) of the study, seed-major: a partial study has whole seeds of every
  arm."""
  arms = tuple(config.study.arms)
  if not arms or not tuple(config.study.seeds):
    raise errors.BadValue("a study needs study.arms and study.seeds (e.g. "
                          "--config=configs/synthetic_study.py).")
  return [Chain(arm, int(s)) for s in config.study.seeds for arm in arms]


def file_loader(path: str, overrides: dict | None = None) -> Loader:
  """Loads arm ARM as `--config=path:ARM` would, with the command line's --config.* overrides
  (except study.arm) applied to every arm."""
  import runpy
  path = path.partition(":")[0]
  overrides = {k: v for k, v in (overrides or {}).items() if k != "study.arm"}

  def load(arm: str) -> ml_collections.ConfigDict:
    c = runpy.run_path(path)["get_config"](arm)
    c.update_from_flattened_dict(overrides)
    return c
  return load


def chain_config(load: Loader, chain: Chain) -> ml_collections.ConfigDict:
  """The arm's config with the chain's seed and results folder."""
  c = load(chain.arm)
  if str(c.study.arm) != chain.arm:
    raise errors.BadValue(f"loading arm {chain.arm!r} gave a config of arm {c.study.arm!r}: "
                          "the config file's get_config(arm) must set study.arm = arm.")
  c.seed = chain.seed  # linked into data, models, sampling and distillation seeds
  c.pipeline.name = chain.name
  c.job = "experiment"
  return c


def out_dir(config, workdir) -> epath.Path:
  return epath.Path(config.study.out) if config.study.out else epath.Path(workdir) / "study"


def run_study(config, load: Loader, workdir: str, *, shard: tuple[int, int] = (0, 1),
              mesh=None, stages: Sequence[str] | None = None) -> dict:
  """Runs this job's chains (k % n == i), writing the study's report from every chain finished
  so far after each, and the chain's record (study.records); a chain with a record of its
  fingerprint and no results in the workdir is finished. Returns {chain name: {stage:
  counts}} of the chains it ran. A chain's report is its result (and record), so `stages`
  that hold the report hold every stage: a report of a part of a chain would count as a
  finished chain."""
  from antidistill_jax import parallel, pipeline
  from antidistill_jax.pipeline import shard_points
  if stages is not None and "report" in stages and set(stages) != set(pipeline.STAGES):
    raise errors.BadValue(
        f"--stages={','.join(stages)}: in a study a chain's report is its result and its "
        "record, so a report of some stages would pass for a finished chain. Run every stage "
        "(leave out --stages: finished stages are reused, nothing is computed again), or leave "
        "out report.")
  mine = shard_points(chains(config), shard)
  kept = records(config, load, workdir)
  done = {}
  for k, chain in enumerate(mine):
    if chain.name in kept and _workdir_results(workdir, chain) is None:
      logging.info("study chain %d/%d: %s is finished (its record)", k + 1, len(mine), chain.name)
      if parallel.is_writer():
        print(f"== {chain.name} ({k + 1}/{len(mine)} of this job): finished, from "
              f"{record_path(config, chain)}", flush=True)
      continue
    logging.info("study chain %d/%d: %s", k + 1, len(mine), chain.name)
    if parallel.is_writer():
      print(f"== {chain.name} ({k + 1}/{len(mine)} of this job)", flush=True)
    x = pipeline.Experiment(chain_config(load, chain), workdir, mesh=mesh)
    done[chain.name] = x.run(stages or pipeline.STAGES)
    if parallel.is_writer():  # after every chain: a long study shows what it has so far
      if "report" in (stages or pipeline.STAGES):  # results.json was just written
        keep_record(config, chain, x)
      write_study_report(config, workdir, kept)
  if parallel.is_writer():  # also when every chain of this job was a record
    written = write_study_report(config, workdir, kept)
    print(f"Study report: {written['table']}", flush=True)
  return done


# -- chain records ---------------------------------------------------------------------------

CALIBRATED = ("ads", "aligned")  # point kinds whose lams the calibrate stage chooses


def fingerprint(x) -> str:
  """What a chain's results depend on, as far as it is known before the chain runs (x: its
  pipeline.Experiment): the lam calibrations' keys (teacher, proxy, g, data, sampling
  settings) and the evaluation key of every student of a point whose lam is not calibrated
  (distillation, student model, evaluation settings). A record is reused only by a chain with
  its fingerprint."""
  from antidistill_jax.pipeline.grid import grid
  from antidistill_jax.pipeline.store import key_of
  calibrations = ("standard", "aligned") if x.config.grid.aligned else ("standard",)
  if x.calibrates:
    points = [p for p in grid(x.config) if p.kind not in CALIBRATED]
  else:
    points = x.all_points()
  return key_of(calibrate=[x.calibrate_key(w) for w in calibrations] if x.calibrates else None,
                students=[x.eval_student_key(s) for s in x.students(points)])


def record_path(config, chain: Chain) -> epath.Path | None:
  """<study.records>/ARM/seedS.json (None when study.records is "")."""
  root = str(config.study.records)
  return epath.Path(root) / chain.arm / f"seed{chain.seed}.json" if root else None


def keep_record(config, chain: Chain, x) -> str | None:
  """Copies a finished chain's report/results.json to its record with its fingerprint, in one
  atomic write (two jobs that finish one chain write the same record); the path, or None when
  there is no record to keep."""
  path, res = record_path(config, chain), _workdir_results(x.workdir, chain)
  if path is None or res is None:
    return None
  files.makedirs(path.parent)
  files.write_json(path, dict(res, fingerprint=fingerprint(x)))
  return os.fspath(path)


def records(config, load: Loader, workdir: str) -> dict[str, dict]:
  """{chain name: results} from the study's records whose fingerprint is the one the current
  code and config give the chain; any other record is logged and left out (its chain runs
  again, and its record is replaced when it finishes)."""
  from antidistill_jax import pipeline
  root = str(config.study.records)
  if root and os.path.abspath(root) == os.path.abspath(os.path.join(workdir, "records")):
    raise errors.BadValue(f"study.records={root} is the workdir's own folder of stage records: "
                          "name another folder (e.g. docs/<study>/chains).")
  out = {}
  for chain in chains(config):
    path = record_path(config, chain)
    if path is None or not path.exists():
      continue
    rec = files.read_json(path)
    want = fingerprint(pipeline.Experiment(chain_config(load, chain), workdir))
    if rec.get("fingerprint") != want:
      logging.warning("study: the record %s is of another computation (fingerprint %s, this "
                      "code and config give %s): left out, its chain runs again.",
                      os.fspath(path), rec.get("fingerprint"), want)
      continue
    out[chain.name] = rec
  return out


# -- the report ------------------------------------------------------------------------------


def _workdir_results(workdir, chain: Chain) -> dict | None:
  """The chain's report/results.json in the workdir (its config's pipeline.name is
  chain.name)."""
  from antidistill_jax.pipeline.inputs import results_root
  path = results_root(workdir, chain.name) / "report" / "results.json"
  return files.read_json(path) if path.exists() else None


_PRIVATE = ("points", "results", "from_record")  # seed_rows' keys not written to results.json


def _complete_mean(values: list[float | None]) -> float | None:
  """The mean, or None when there is no value or any is missing (never a mean of a part)."""
  return sum(values) / len(values) if values and None not in values else None


def seed_rows(config, workdir, kept: dict[str, dict] | None = None) -> list[dict]:
  """One row per finished chain (in the workdir, or kept as a record): its matched rows (ADS
  and control, by rank), its primary values (mean gap over the ADS points, over the control
  points; None unless every point of that kind has a gap) and the mean NLL gaps. Each row
  also holds the chain's whole results.json (`results`) and whether it came from its record
  (`from_record`); `_PRIVATE` lists those keys, which results.json's "seeds" leaves out."""
  rows = []
  for chain in chains(config):
    res, from_record = _workdir_results(workdir, chain), False
    if res is None:
      res, from_record = (kept or {}).get(chain.name), True
    if res is None:
      continue
    matched = res.get("matched") or []
    ads = sorted((r for r in matched if r.get("kind", "ads") == "ads"), key=lambda r: r["lam"])
    control = sorted((r for r in matched if r.get("kind") == "control"), key=lambda r: r["tau"])
    row = dict(arm=chain.arm, seed=chain.seed, ads=ads, control=control)
    for kind, rs in (("ads", ads), ("control", control)):
      row[f"{kind}_gap"] = _complete_mean([r["gap"] for r in rs])
      row[f"{kind}_loss_gap"] = _complete_mean([r.get("loss_gap") for r in rs])
      for role in ROLES:
        row[f"{kind}_{role}_gap"] = _complete_mean(
            [(r.get("role_loss_gaps") or {}).get(role) for r in rs])
    row.update(points=res.get("points") or [], results=res, from_record=from_record)
    rows.append(row)
  return rows


def _summary_row(label: str, values: list[float | None], nll: list[float | None],
                 teacher: list[float | None], n_chains: int) -> dict:
  s = stats.summarize(values)
  return dict(label=label, n=s["n"], left_out=n_chains - s["n"], summary=s,
              teacher=stats.summarize(teacher)["mean"], nll=stats.summarize(nll))


def results_rows(config, rows: list[dict]) -> list[dict]:
  """Per arm: the primary row (ADS, all points), one row per ADS point, the A/A control row and
  one per control point. Each summarizes per-seed values over the seeds that have them."""
  out = []
  for arm in config.study.arms:
    mine = [r for r in rows if r["arm"] == arm]
    if not mine:
      continue
    for kind, title in (("ads", "ADS"), ("control", "A/A control")):
      ranks = max((len(r[kind]) for r in mine), default=0)
      if not ranks:
        continue
      teacher = [sum(p["teacher"] for p in r[kind]) / len(r[kind]) if r[kind] else None
                 for r in mine]
      out.append(dict(_summary_row(f"{title}, mean over its {ranks} points",
                                   [r[f"{kind}_gap"] for r in mine],
                                   [r[f"{kind}_loss_gap"] for r in mine], teacher, len(mine)),
                      arm=arm, kind=kind, rank=0))
      for k in range(ranks):
        at = [r[kind][k] if len(r[kind]) > k else {} for r in mine]
        if kind == "ads":  # each seed calibrates its own lams: the k-th smallest
          label = f"{title} point {k + 1} (lam rank {k + 1})"
        else:  # the control's taus are the config's, the same in every seed
          label = f"{title} point {k + 1} (tau {next(a['tau'] for a in at if a):g})"
        out.append(dict(_summary_row(label, [a.get("gap") for a in at],
                                     [a.get("loss_gap") for a in at],
                                     [a.get("teacher") for a in at], len(mine)),
                        arm=arm, kind=kind, rank=k + 1))
  return out


def fewer_points_rows(config, rows: list[dict]) -> list[dict]:
  """Per arm where some chain has fewer ADS points than the arm's others (the calibration
  merges lams that aim at one teacher accuracy; such a chain's G is the mean over the points
  it has): the primary ADS row over only the chains with every point."""
  out = []
  for arm in config.study.arms:
    mine = [r for r in rows if r["arm"] == arm]
    most = max((len(r["ads"]) for r in mine), default=0)
    full = [r for r in mine if len(r["ads"]) == most]
    if len(full) < len(mine):
      teacher = [sum(p["teacher"] for p in r["ads"]) / most for r in full]
      out.append(dict(_summary_row(f"ADS, only the chains with all {most} points",
                                   [r["ads_gap"] for r in full],
                                   [r["ads_loss_gap"] for r in full], teacher, len(full)),
                      arm=arm, kind="ads", rank=0))
  return out


def seed_table(rows: list[dict]) -> str:
  """One line per finished chain: its ADS points, G, C and the ADS students' NLL gap."""
  nats = lambda x: "-" if x is None else f"{x:+.4f}"
  lines = ["| arm | seed | ADS points | ADS student gap G, points | A/A gap C, points | "
           "ADS NLL gap, nats/token |", "|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['arm']} | {r['seed']} | {len(r['ads'])} | {_pts(r['ads_gap'])} | "
            f"{_pts(r['control_gap'])} | {nats(r['ads_loss_gap'])} |" for r in rows]
  return "\n".join(lines) + "\n"


def contrast_rows(config, rows: list[dict]) -> list[dict]:
  """Per study.contrasts pair (a, b) and kind: arm a's primary value minus arm b's, paired by
  seed (the seeds where both have one)."""
  out = []
  by_seed = {(r["arm"], r["seed"]): r for r in rows}
  seeds = sorted({r["seed"] for r in rows})
  for a, b in config.study.contrasts:
    for kind, title in (("ads", "ADS"), ("control", "A/A control")):
      diffs = []
      for s in seeds:
        ra, rb = by_seed.get((a, s)), by_seed.get((b, s))
        if ra and rb and ra[f"{kind}_gap"] is not None and rb[f"{kind}_gap"] is not None:
          diffs.append(ra[f"{kind}_gap"] - rb[f"{kind}_gap"])
      if diffs:
        out.append(dict(arm=f"{a} minus {b}", kind=kind, rank=0,
                        label=f"{title}: student gap difference",
                        n=len(diffs), left_out=len(seeds) - len(diffs), teacher=None,
                        summary=stats.summarize(diffs), nll=stats.summarize([])))
  return out


def _pts(x) -> str:
  """An accuracy difference in points, "+2.0" ("-" when None)."""
  return "-" if x is None else f"{100 * x:+.1f}"


def _ci_text(ci) -> str:
  """A 95% interval of an accuracy difference in points, "[-2.0, +10.2]" ("-" when None)."""
  return "-" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


OUTCOMES = ("too few seeds", "no control", "unreliable", "poisons", "helps", "none detected")


def decision(ads: dict, control: dict | None, planned: int, finished: int) -> dict:
  """The plan's decision rules (docs/synthetic/PLAN.md, "Decision rules") applied to an arm's
  primary summary `ads` and its A/A control's `control` (stats.summarize dicts), with
  `finished` of the `planned` chains done (a finished chain without a value is left out, not
  waited for): {outcome (one of OUTCOMES), interim (chains left to run), text}."""
  n = ads["n"]
  interim = finished < planned
  head = (f"Interim, {finished} of {planned} seeds (the plan decides at {planned}; looking "
          "early raises the chance of a false positive), so far: " if interim else "")
  if ads["p"] is None:
    outcome, text = "too few seeds", f"too few seeds for a test ({n})."
  else:
    shown = f"G = {100 * ads['mean']:+.1f} points {_ci_text(ads['ci'])}, p = {ads['p']:.3f}"
    if control is None or control["ci"] is None:
      outcome, text = "no control", f"{shown}: no A/A interval to check the matching; no decision."
    elif stats.excludes_zero(control["ci"]):
      outcome = "unreliable"
      text = (f"{shown}, but the A/A control's interval excludes 0 (C = "
              f"{100 * control['mean']:+.1f} {_ci_text(control['ci'])}): the matching is biased in this arm, "
              "its result unreliable.")
    elif ads["p"] < stats.ALPHA:
      outcome = "poisons" if ads["mean"] < 0 else "helps"
      text = f"**ADS {outcome} students** here: {shown}; A/A control consistent with 0."
    else:
      outcome = "none detected"
      text = (f"no difference detected: {shown}; A/A control consistent with 0. Gaps inside "
              "the interval remain possible; this does not show that ADS has no effect.")
  return dict(outcome=outcome, interim=interim, text=head + text)


def decisions(config, summary: list[dict]) -> dict[str, dict]:
  """{arm: decision} for each of the plan's primary arms (study.primary) that has a primary
  row."""
  rows = {(r["arm"], r["kind"]): r for r in summary if r["rank"] == 0}
  planned = len(tuple(config.study.seeds))
  out = {}
  for arm in tuple(config.study.primary):
    ads, control = rows.get((arm, "ads")), rows.get((arm, "control"))
    if ads is not None:
      out[arm] = decision(ads["summary"], control and control["summary"], planned,
                          ads["n"] + ads["left_out"])
  return out


def results_table(rows: list[dict]) -> str:
  lines = ["| arm | what | seeds | teacher acc | student gap, points | 95% CI (t) | 95% CI "
           "(bootstrap) | p (paired t) | detectable at 80% power | NLL gap, nats/token "
           "[95% CI] |",
           "|---|---|---|---:|---:|---|---|---:|---:|---|"]
  for r in rows:
    s = r["summary"]
    seeds = f"{r['n']}" + (f" ({r['left_out']} left out)" if r["left_out"] else "")
    nll = stats.fmt_summary(r["nll"], points=False)
    p = "-" if s["p"] is None else f"{s['p']:.3f}"
    mde = "-" if s["mde"] is None else f"{100 * s['mde']:.1f}"
    teacher = "-" if r["teacher"] is None else f"{r['teacher']:.3f}"
    lines.append(f"| {r['arm']} | {r['label']} | {seeds} | {teacher} | {_pts(s['mean'])} | "
                 f"{_ci_text(s['ci'])} | {_ci_text(s['bootstrap_ci'])} | {p} | {mde} | {nll} |")
  return "\n".join(lines) + "\n"


def role_table(config, rows: list[dict]) -> str:
  """Where the poison lives: per arm, the NLL gap (a point's students minus the temperature
  students at the same teacher accuracy, on clean traces g never saw) on answer,
  writing-choice and reasoning tokens, mean over points, 95% t CI over seeds."""
  lines = ["| arm | what | seeds | " + " | ".join(f"NLL gap, {r} tokens" for r in ROLES) + " |",
           "|---|---|---|" + "---|" * len(ROLES)]
  found = False
  for arm in config.study.arms:
    mine = [r for r in rows if r["arm"] == arm]
    for kind, title in (("ads", "ADS"), ("control", "A/A control")):
      cells = [stats.summarize([r.get(f"{kind}_{role}_gap") for r in mine]) for role in ROLES]
      if not any(c["n"] for c in cells):
        continue
      found = True
      n = ", ".join(sorted({str(c["n"]) for c in cells}))
      lines.append(f"| {arm} | {title} | {n} | "
                   + " | ".join(stats.fmt_summary(c, points=False) for c in cells) + " |")
  return "\n".join(lines) + "\n" if found else ""


def student_rows(rows: list[dict]) -> list[dict]:
  """Every student of every finished chain: its point, replicate, accuracy and NLL."""
  out = []
  for r in rows:
    for e in r["points"]:
      for s in e.get("students", []):
        out.append(dict(arm=r["arm"], seed=r["seed"], point=e["name"], kind=e["point"]["kind"],
                        tau=e["point"]["tau"], lam=e["point"]["lam"],
                        teacher=report._acc(e, "teacher_eval"), replicate=s["replicate"],
                        distill_key=s.get("distill_key"),
                        student=(s.get("student_eval") or {}).get("accuracy"),
                        nll=(s.get("distill") or {}).get("holdout_loss")))
  return out


def between_students(students: list[dict]) -> dict:
  """The accuracy SD between the replicate students of one trace set (distillation seeds and
  test-set noise; pooled within-set variance), per arm and over every set, with the number of
  sets behind it. Sets two arms share (free_writing_g_tau1 reuses free_writing's temperature
  and control students: the same distillation keys) count once in the pooled figure. What a
  replicate costs in precision: the study's main-job reduction is chosen from it and the
  between-seed SD, not from gaps."""
  groups: dict[tuple, list[dict]] = {}
  for st in students:
    if st["student"] is not None:
      groups.setdefault((st["arm"], st["seed"], st["point"]), []).append(st)
  sets = {k: [float(st["student"]) for st in v] for k, v in groups.items() if len(v) >= 2}
  # One set's identity: its students' distillation keys (shared sets have the same ones).
  identity = {k: tuple(sorted(str(st.get("distill_key")) for st in groups[k])) for k in sets}

  def pooled(values: list[list[float]]) -> dict:
    df = sum(len(v) - 1 for v in values)
    ss = sum(float(np.sum((np.asarray(v) - np.mean(v)) ** 2)) for v in values)
    return dict(sd=math.sqrt(ss / df) if df else None, sets=len(values))

  arms = sorted({k[0] for k in sets})
  unique = {identity[k]: v for k, v in sets.items()}
  return dict(by_arm={a: pooled([v for k, v in sets.items() if k[0] == a]) for a in arms},
              pooled=pooled(list(unique.values())))


def student_table(students: list[dict]) -> str:
  fmt = lambda x, f: "-" if x is None else format(x, f)
  lines = ["| arm | seed | point | replicate | teacher acc | student acc | student NLL |",
           "|---|---:|---|---:|---:|---:|---:|"]
  lines += [f"| {s['arm']} | {s['seed']} | {s['point']} | {s['replicate']} | "
            f"{fmt(s['teacher'], '.3f')} | {fmt(s['student'], '.3f')} | {fmt(s['nll'], '.4f')} |"
            for s in students]
  return "\n".join(lines) + "\n"


def forest_plot(rows: list[dict], path) -> bool:
  """Gap and 95% CI per arm and point, the A/A rows among them; False when nothing to draw."""
  drawn = [r for r in rows if r["summary"]["ci"] is not None]
  if not drawn:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.35 * len(drawn) + 1.2))
  for i, r in enumerate(reversed(drawn)):
    s = r["summary"]
    color = "tab:red" if r["kind"] == "ads" else "tab:gray"
    ax.errorbar(100 * s["mean"], i, xerr=[[100 * (s["mean"] - s["ci"][0])],
                                          [100 * (s["ci"][1] - s["mean"])]],
                fmt="D" if r["rank"] == 0 else "o", color=color, capsize=3)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.set_yticks(range(len(drawn)))
  ax.set_yticklabels([f"{r['arm']}: {r['label']} (n={r['n']})" for r in reversed(drawn)],
                     fontsize=7)
  ax.set_xlabel("student accuracy minus temperature students' at the same teacher accuracy\n"
                "(points; 95% t CI over seeds)", fontsize=8)
  ax.set_title("ADS and the A/A control against temperature sampling", fontsize=9)
  fig.tight_layout()
  report._save_png(fig, path)
  plt.close(fig)
  return True


def write_study_report(config, workdir, kept: dict[str, dict] | None = None) -> dict:
  """study.out/results.md (the results table, then every student), results.json and
  forest.png, from the chains finished so far (in the workdir, or `kept`: `records`)."""
  out = out_dir(config, workdir)
  files.makedirs(out)
  rows = seed_rows(config, workdir, kept)
  summary = results_rows(config, rows)
  students = student_rows(rows)
  n_chains = len(chains(config))
  from_records = sum(r["from_record"] for r in rows)
  recorded = (f" ({from_records} of them read from their records in {config.study.records})"
              if from_records else "")
  text = [f"# Study: {', '.join(config.study.arms)}; seeds {list(config.study.seeds)}\n\n",
          f"{len(rows)} of {n_chains} chains finished{recorded}; {len(students)} students.\n\n",
          "Student gap: a point's students' mean accuracy minus the temperature students' "
          "interpolated at the point's teacher accuracy, per seed; negative means its students "
          "learned less. The A/A control is a second temperature sweep (other sampling "
          "seeds) analysed the same way: it should be consistent with 0. NLL gap: the same "
          "for the students' NLL on clean teacher traces.\n\n",
          results_table(summary)]
  decided = decisions(config, summary)
  if decided:
    significant = sum(d["outcome"] in ("poisons", "helps") for d in decided.values())
    text += ["\n## The plan's decisions\n\nThe decision rules of the plan, applied as written "
             "to each primary arm's ADS row (G) and A/A row (C), two-sided alpha "
             f"{stats.ALPHA}:\n\n"] + [f"- {arm}: {d['text']}\n" for arm, d in decided.items()]
    if len(decided) > 1:
      text.append(f"\n{len(decided)} primary tests at alpha {stats.ALPHA} each: the chance "
                  "of at least one false positive is up to "
                  f"{100 * (1 - (1 - stats.ALPHA) ** len(decided)):.0f}%"
                  + (" (only one arm is significant)." if significant == 1 else ".") + "\n")
  fewer = fewer_points_rows(config, rows)
  if fewer:
    text += ["\n## Chains with fewer ADS points\n\nThe calibration merges lams that aim at one "
             "teacher accuracy, so a chain can have fewer ADS points than its arm's others; its "
             "G is the mean over the points it has. The primary ADS row over only the chains "
             "with every point:\n\n", results_table(fewer)]
  contrasts = contrast_rows(config, rows)
  if contrasts:
    text += ["\n## Arms against each other\n\nOne arm's per-seed student gap minus "
             "another's, on the seeds both have (paired by seed):\n\n",
             results_table(contrasts)]
  roles = role_table(config, rows)
  if roles:
    text += ["\n## Where the poison lives\n\nNLL gap (nats/token) by token role "
             "(`data.synthetic.token_roles`: answer = the last '#' and the answer, writing = "
             "separators and each step's first character, reasoning = the rest), mean over "
             "the points, 95% t CI over seeds:\n\n", roles]
  spread = between_students(students)
  if spread["pooled"]["sd"] is not None:
    text += ["\n## Between the students of one trace set\n\nAccuracy SD between replicate "
             "students of the same trace set (distillation seed and test-set noise), pooled: "
             f"{100 * spread['pooled']['sd']:.1f} points over {spread['pooled']['sets']} sets; "
             + "; ".join(f"{a} {100 * v['sd']:.1f} ({v['sets']} sets)"
                         for a, v in spread["by_arm"].items()) + ".\n"]
  if rows:
    text += ["\n## Every chain\n\n", seed_table(rows)]
  text += ["\n## Every student\n\n", student_table(students)]
  files.write_atomic(out / "results.md", "".join(text).encode("utf-8"))
  files.write_json(out / "results.json", dict(summary=summary, decisions=decided,
                                              fewer_points=fewer, contrasts=contrasts, seeds=[
      {k: v for k, v in r.items() if k not in _PRIVATE} for r in rows], students=students,
      between_students=spread))
  written = dict(table=os.fspath(out / "results.md"))
  if forest_plot(summary, out / "forest.png"):
    written["forest"] = os.fspath(out / "forest.png")
  if config.study.matrix:  # the defence x attacker matrix (configs/matrix.py)
    from antidistill_jax import matrix
    if rows:
      written.update({f"matrix_{k}": v for k, v in matrix.write_matrix_report(
          [r["results"] for r in rows], out, planned=n_chains,
          secondary=tuple(config.study.matrix_secondary)).items()})
  return written
