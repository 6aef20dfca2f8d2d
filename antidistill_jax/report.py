"""The experiment's report from whatever results exist: the paper's Figure 3 and Figure 5 and a
table of every point.

  write_report(workdir)   # workdir/report/{figure3.png, figure5.png, results.md, results.json}

It reads workdir/index/<point>.json, which the pipeline's report stage derives from the
records of the current keys (`pipeline.reporting`; a point may lack some fields: a partial grid
still reports what it has), and index/base.json (the undistilled student).
  Figure 3: teacher accuracy against distilled-student accuracy, one marker per trace set,
            ADS points and the temperature sweep as two series labelled with lam / tau, the
            undistilled student as a dashed line.
  Figure 5: each student's train and holdout loss against the step.
"""

from __future__ import annotations

import io
from typing import Any

from etils import epath

from antidistill_jax import files


# Point kinds matched against the temperature sweep.
DEFENCES = ("ads", "control", "poe", "aligned")


def _read(path) -> Any:
  return files.read_json(path)


def _save_png(fig, path) -> None:
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  files.write_atomic(path, png.getvalue())


def _index_entries(workdir) -> list[tuple[str, dict]]:
  index = epath.Path(workdir) / "index"
  paths = sorted(p for p in (index.iterdir() if index.exists() else []) if p.suffix == ".json")
  return [(p.name, _read(p)) for p in paths]


def _sort(entries: list[dict]) -> list[dict]:
  return sorted(entries, key=lambda e: (e["point"]["kind"], e["point"]["tau"], e["point"]["lam"]))


def collect(workdir) -> tuple[list[dict], dict | None]:
  """(point entries sorted by kind, tau, lam; the base entry or None). Students of attackers
  are left out (collect_attacks)."""
  entries, base = [], None
  for name, entry in _index_entries(workdir):
    if name == "base.json":
      base = entry
    elif "point" in entry and not entry.get("attack"):
      entries.append(entry)
  return _sort(entries), base


def collect_attacks(workdir) -> dict[str, list[dict]]:
  """{attack: entries of its students}, each entry completed with its point's teacher
  evaluation and trace statistics (an attacker changes only what the student trains on)."""
  plain = {e["name"]: e for e in collect(workdir)[0]}
  out: dict[str, list[dict]] = {}
  for _, entry in _index_entries(workdir):
    if entry.get("attack") and entry.get("base") in plain:
      base = plain[entry["base"]]
      merged = dict(entry, teacher_eval=base.get("teacher_eval"), traces=base.get("traces"))
      out.setdefault(entry["attack"], []).append(merged)
  return {k: _sort(v) for k, v in sorted(out.items())}


def _weighting(attack: str, entry: dict) -> dict:
  """{beta, top20_mass} of a reweighting attacker's student (attacks.trace_weights' statistics
  in its distill record), else {}: how concentrated the weights it trained with were."""
  from antidistill_jax import attacks
  name = attacks.parse(attack)[0]
  stats = (entry.get("distill") or {}).get(name) if name in attacks.REWEIGHT else None
  return {k: stats[k] for k in ("beta", "top20_mass")} if isinstance(stats, dict) else {}


def attack_rows(workdir) -> list[dict]:
  """Per attacker and ADS point: the attacked ADS student against temperature students at the
  same teacher accuracy; the temperature students are attacked too where the attacker applies
  to them (the filters keep_correct and reaimed), else the plain ones (clean_mix). Also the
  unattacked ADS student of the point."""
  entries, _ = collect(workdir)
  plain_ads = {e["name"]: e for e in entries if e["point"]["kind"] in DEFENCES}
  temps = [e for e in entries if e["point"]["kind"] == "temperature"]
  rows = []
  for attack, attacked in collect_attacks(workdir).items():
    attacked_temps = [e for e in attacked if e["point"]["kind"] == "temperature"]
    ads = {e["name"]: e for e in attacked if e["point"]["kind"] in DEFENCES}
    for r in matched(list(ads.values()) + (attacked_temps or temps)):
      e = ads[r["name"]]
      rows.append(dict(r, attack=attack, against="attacked" if attacked_temps else "plain",
                       unattacked_ads_student=_acc(plain_ads.get(e["base"], {}), "student_eval"),
                       train_rows=(e.get("distill") or {}).get("train_rows")))
  return rows


def attack_table(rows: list[dict]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lines = ["| attacker | lam | teacher acc | ADS student, unattacked | ADS student, attacked | "
           "temperature student (same teacher acc) | attacked ADS minus temperature | "
           "NLL: attacked ADS minus temperature | traces trained on |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    temp = f"{fmt(r['temperature_student'])} ({r['against']})"
    lines.append(f"| {r['attack']} | {r['lam']:.4g} | {fmt(r['teacher'])} | "
                 f"{fmt(r['unattacked_ads_student'])} | {fmt(r['ads_student'])} | {temp} | "
                 f"{fmt(r['gap'])} | {fmt(r['loss_gap'])} | {r['train_rows'] or '-'} |")
  return "\n".join(lines) + "\n"


def _acc(entry: dict, which: str, forced: bool = False):
  ev = entry.get(which) or {}
  return ev.get("forced_accuracy" if forced else "accuracy")


def table(entries: list[dict], base: dict | None) -> str:
  fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
  lines = ["| point | kind | tau | lam | teacher acc | teacher forced | student acc | "
           "student forced | student holdout loss | train traces acc |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for e in entries:
    p = e["point"]
    lines.append(
        f"| {e.get('name', '')} | {p['kind']} | {p['tau']:.3g} | {p['lam']:.4g} | "
        f"{fmt(_acc(e, 'teacher_eval'))} | {fmt(_acc(e, 'teacher_eval', True))} | "
        f"{fmt(_acc(e, 'student_eval'))} | {fmt(_acc(e, 'student_eval', True))} | "
        f"{fmt((e.get('distill') or {}).get('holdout_loss'))} | "
        f"{fmt((e.get('traces') or {}).get('accuracy'))} |")
  if base is not None:
    lines.append(f"| undistilled student | - | - | - | - | - | {fmt(_acc(base, 'student_eval'))} "
                 f"| {fmt(_acc(base, 'student_eval', True))} | - | - |")
  return "\n".join(lines) + "\n"


def _weights(xs: list[float], x: float) -> list[float] | None:
  """Weights of linear interpolation at x through points sorted by x (the value at x is
  sum(w * y)); None outside [xs[0], xs[-1]]."""
  if not xs or x < xs[0] or x > xs[-1]:
    return None
  w = [0.0] * len(xs)
  for k in range(1, len(xs)):
    if x <= xs[k]:
      span = xs[k] - xs[k - 1]
      f = 1.0 if span == 0 else (x - xs[k - 1]) / span
      w[k - 1], w[k] = 1.0 - f, f
      return w
  w[-1] = 1.0
  return w


def _at(w: list[float], ys: list[float]) -> float:
  """The value interpolated with `_weights` w: sum(w * y) (points of weight 0 left out)."""
  return sum(a * y for a, y in zip(w, ys) if a)


def _students(entry: dict) -> int:
  return int((entry.get("student_eval") or {}).get("n_students", 1))


def matched(entries: list[dict]) -> list[dict]:
  """Each ADS point (and each A/A control point, analysed the same way) against the
  temperature sweep at the same teacher accuracy: the sweep's student accuracy and student
  holdout loss (NLL on clean teacher traces) interpolated linearly in teacher accuracy; None
  where the point lies outside the sweep's range. The gap is ADS minus temperature: negative
  student accuracy means ADS students learned less. Accuracies are the means over a point's
  students (replicates)."""
  temp_entries = sorted((e for e in entries if e["point"]["kind"] == "temperature"
                         and _acc(e, "teacher_eval") is not None
                         and _acc(e, "student_eval") is not None),
                        key=lambda e: _acc(e, "teacher_eval"))
  temps = [(_acc(e, "teacher_eval"), _acc(e, "student_eval"),
            (e.get("distill") or {}).get("holdout_loss")) for e in temp_entries]
  xs = [t for t, _, _ in temps]
  rows = []
  for e in entries:
    teacher, student = _acc(e, "teacher_eval"), _acc(e, "student_eval")
    if e["point"]["kind"] not in DEFENCES or teacher is None or student is None:
      continue
    loss = (e.get("distill") or {}).get("holdout_loss")
    weights = _weights(xs, teacher)
    temp_student = None if weights is None else _at(weights, [s for _, s, _ in temps])
    temp_loss = (_at(weights, [l for _, _, l in temps])
                 if weights is not None and all(l is not None for _, _, l in temps) else None)
    role_gaps = {}
    roles = (e.get("distill") or {}).get("nll_by_role") or {}
    for role, value in roles.items():
      curve = [((t.get("distill") or {}).get("nll_by_role") or {}).get(role) for t in temp_entries]
      if value is not None and all(v is not None for v in curve):
        role_gaps[role] = None if weights is None else value - _at(weights, curve)
    rows.append(dict(name=e.get("name"), kind=e["point"]["kind"], tau=e["point"]["tau"],
                     role_loss_gaps=role_gaps,
                     lam=e["point"]["lam"], teacher=teacher,
                     ads_student=student, students=_students(e),
                     temperature_student=temp_student,
                     # the temperature points behind temperature_student: name, weight, students
                     against=[dict(name=t.get("name"), weight=w, students=_students(t))
                              for t, w in zip(temp_entries, weights or []) if w],
                     gap=None if temp_student is None else student - temp_student,
                     ads_loss=loss, temperature_loss=temp_loss,
                     loss_gap=None if loss is None or temp_loss is None else loss - temp_loss))
  return rows


def run_gap(rows: list[dict], student_sd: float) -> dict | None:
  """This run's primary value, the mean gap over its ADS points (None unless every ADS point
  has one), with the standard error that student noise alone gives it: each student's
  accuracy is taken to vary with SD `student_sd` around its trace set's value, independently
  (replicate students of one set, as a study measures them). With K points, R_k students at
  point k and the temperature students j weighted w_kj by the interpolation,
  Var = sd^2 (sum_k 1 / (K^2 R_k) + sum_j c_j^2 / R_j), c_j = sum_k w_kj / K (the temperature
  students are shared by the points). Seed-to-seed variation (problems, models, g) is not in
  it. Returns `stats.known_sd`'s fields."""
  from antidistill_jax import stats
  ads = [r for r in rows if r["kind"] == "ads"]
  if not ads or any(r["gap"] is None for r in ads):
    return None
  k = len(ads)
  shared: dict[str, list] = {}
  for r in ads:
    for t in r["against"]:
      shared.setdefault(t["name"], [0.0, t["students"]])[0] += t["weight"] / k
  var = sum(1 / (k * k * r["students"]) for r in ads)
  var += sum(c * c / n for c, n in shared.values())
  out = stats.known_sd(sum(r["gap"] for r in ads) / k, float(student_sd) * var ** 0.5)
  return dict(out, points=k, students=sorted({r["students"] for r in ads}), student_sd=student_sd)


def matched_table(rows: list[dict]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lines = ["| point | lam | teacher acc | student | temperature student (same teacher acc) | "
           "minus temperature | student NLL | temperature student NLL |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['lam']:.4g} | {fmt(r['teacher'])} | "
                 f"{fmt(r['ads_student'])} | {fmt(r['temperature_student'])} | {fmt(r['gap'])} | "
                 f"{fmt(r['ads_loss'])} | {fmt(r['temperature_loss'])} |")
  return "\n".join(lines) + "\n"


def figure3(entries: list[dict], base: dict | None, path: str, forced: bool = False) -> bool:
  """Teacher against student accuracy; False (no file) when no point has both."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = {kind: ([], [], []) for kind in ("ads", "temperature", "control", "poe", "aligned")}
  for e in entries:
    t, s = _acc(e, "teacher_eval", forced), _acc(e, "student_eval", forced)
    if t is None or s is None:
      continue
    p = e["point"]
    xs, ys, labels = series[p["kind"]]
    xs.append(s)
    ys.append(t)
    labels.append(f"λ={p['lam']:.3g}" if p["kind"] in ("ads", "aligned") else
                  f"γ={p['lam']:.3g}, τ={p['tau']:.3g}" if p["kind"] == "poe" else
                  f"τ={p['tau']:.3g}")
  if not any(xs for xs, _, _ in series.values()):
    return False
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  styles = {"ads": dict(marker="o", color="tab:red", label="antidistillation"),
            "temperature": dict(marker="s", color="tab:blue", label="temperature"),
            "control": dict(marker="^", color="tab:gray", label="temperature, A/A control"),
            "poe": dict(marker="D", color="tab:green", label="product of experts"),
            "aligned": dict(marker="v", color="tab:purple", label="ADS, answer-aligned g")}
  for kind, (xs, ys, labels) in series.items():
    if xs:
      ax.scatter(xs, ys, **styles[kind])
      for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  base_acc = None if base is None else _acc(base, "student_eval", forced)
  if base_acc is not None:
    ax.axvline(base_acc, color="gray", linestyle="--", label="undistilled student")
  ax.set_xlabel("student accuracy" + (" (answer-forced)" if forced else ""))
  ax.set_ylabel("teacher accuracy" + (" (answer-forced)" if forced else ""))
  ax.set_title("Teacher vs distilled student (Figure 3)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_png(fig, path)
  plt.close(fig)
  return True


def figure5(entries: list[dict], path: str) -> bool:
  """Train and holdout loss curves of every student; False when none exists yet."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = [(e, _read(e["curves"])) for e in entries
            if e.get("curves") and epath.Path(e["curves"]).exists()]
  if not curves:
    return False
  fig, (train_ax, held_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for e, history in curves:
    p = e["point"]
    label = (f"ADS λ={p['lam']:.3g}" if p["kind"] == "ads" else
             f"{'control' if p['kind'] == 'control' else 'temp'} τ={p['tau']:.3g}")
    style = "-" if p["kind"] == "ads" else ":"
    train_ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], style,
                  label=label)
    held = [h for h in history if "holdout_loss" in h]
    held_ax.plot([h["step"] for h in held], [h["holdout_loss"] for h in held], style + "o",
                 markersize=3, label=label)
  for ax, title in ((train_ax, "train loss"), (held_ax, "holdout loss (clean teacher traces)")):
    ax.set_xlabel("step")
    ax.set_ylabel("NLL per token")
    ax.set_title(title)
  held_ax.legend(fontsize=7)
  fig.suptitle("Students on each trace set (Figure 5)")
  fig.tight_layout()
  _save_png(fig, path)
  plt.close(fig)
  return True


def run_gap_text(gap: dict, source: str) -> str:
  """The paragraph under the matched table that states `run_gap`'s result."""
  pts = lambda x: f"{100 * x:+.1f}"
  students = "/".join(str(n) for n in gap["students"])
  where = "At its ADS point" if gap["points"] == 1 else f"Over its {gap['points']} ADS points"
  plural = "" if students == "1" else "s"
  return (f"\n{where}, this run's student gap is **{pts(gap['mean'])} points, 95% CI "
          f"[{pts(gap['ci'][0])}, {pts(gap['ci'][1])}]** (p = {gap['p']:.2g}) from student "
          f"noise alone (each student's accuracy SD {100 * gap['student_sd']:.1f} points: "
          f"{source}). One seed with {students} student{plural} per trace set detects a gap "
          f"above {100 * gap['mde']:.1f} points (80% power, alpha 0.05). Seed-to-seed "
          "variation (other problems, models and g) is not in this interval: only replicated "
          "seeds (a study) measure it.\n")


def write_report(workdir, *, student_sd: float | None = None, student_sd_source: str = ""
                 ) -> dict:
  """Writes workdir/report/ (local or gs://) from the index; returns {what: path} of the files
  written. With `student_sd` (the SD of one student's accuracy between replicate students of
  a trace set, measured elsewhere: `student_sd_source`), the mean gap over the ADS points gets
  a CI from student noise and the effect this run can detect (`run_gap`)."""
  entries, base = collect(workdir)
  out = epath.Path(workdir) / "report"
  files.makedirs(out)
  written = {}
  md = out / "results.md"
  rows = matched(entries)
  text = table(entries, base)
  if rows:
    text += ("\nADS (and the A/A control, if any) against the temperature sweep at the same "
             "teacher accuracy (interpolated; student accuracies are means over a point's "
             "students; NLL: student holdout loss on clean teacher traces):\n\n"
             + matched_table(rows))
  gap = run_gap(rows, student_sd) if rows and student_sd else None
  if gap is not None:
    text += run_gap_text(gap, student_sd_source or "report.student_sd")
  attacked = attack_rows(workdir)
  if attacked:
    text += ("\nAttackers distilling from the same traces (antidistill_jax/attacks.py), against "
             "temperature students at the same teacher accuracy:\n\n" + attack_table(attacked))
  files.write_atomic(md, text.encode("utf-8"))
  written["table"] = str(md)
  attacked_points = [dict(attack=a, name=e["name"], kind=e["point"]["kind"],
                          tau=e["point"]["tau"], lam=e["point"]["lam"],
                          teacher=_acc(e, "teacher_eval"), student=_acc(e, "student_eval"),
                          **_weighting(a, e))
                     for a, es in collect_attacks(workdir).items() for e in es]
  files.write_json(out / "results.json", dict(points=entries, base=base, matched=rows,
                                              run_gap=gap, attacks=attacked,
                                              attacked_points=attacked_points))
  for name, make in (("figure3", lambda p: figure3(entries, base, p)),
                     ("figure3_forced", lambda p: figure3(entries, base, p, forced=True)),
                     ("figure5", lambda p: figure5(entries, p))):
    path = out / f"{name}.png"
    if make(path):
      written[name] = str(path)
  return written


# -- several seeds ----------------------------------------------------------------------------


def _mean_sd(xs: list[float]) -> str:
  import statistics
  if not xs:
    return "-"
  sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
  sign = "+" if any(x < 0 for x in xs) else ""  # differences show their sign
  return f"{statistics.fmean(xs):{sign}.3f} ± {sd:.3f}"


def complete(rows: list[dict], keys: tuple[str, ...]) -> tuple[list[dict], int]:
  """(the rows that have every key's value, how many were left out): a table row's seed count
  is then the count behind each of its values, never a mix."""
  kept = [r for r in rows if all(r.get(k) is not None for k in keys)]
  return kept, len(rows) - len(kept)


_SEED_KEYS = ("lam", "teacher", "ads_student", "temperature_student", "gap")


def _left_out(n: int) -> str:
  return f" ({n} left out: outside the temperature sweep, or unfinished)" if n else ""


def seeds_table(runs: dict[str, list[dict]]) -> str:
  """Mean ± sd over runs (seeds) of the matched ADS rows, grouped by the ADS point's rank in
  lam (a calibrated grid aims every seed's k-th point at the same teacher accuracy). A row
  counts only the seeds that have all its values (the NLL column: those of them with NLLs)."""
  runs = {k: [r for r in rows if r.get("kind", "ads") == "ads"] for k, rows in runs.items()}
  ranks = max((len(rows) for rows in runs.values()), default=0)
  lines = ["| ADS point (by lam) | seeds | lam | teacher acc | ADS student | temperature student "
           "| ADS minus temperature | NLL: ADS minus temperature |",
           "|---:|---|---|---|---|---|---|---|"]
  for k in range(ranks):
    rows, dropped = complete([sorted(r, key=lambda x: x["lam"])[k] for r in runs.values()
                              if len(r) > k], _SEED_KEYS)
    col = lambda key: [r[key] for r in rows]
    losses = [r["loss_gap"] for r in rows if r.get("loss_gap") is not None]
    lines.append(f"| {k + 1} | {len(rows)}{_left_out(dropped)} | {_mean_sd(col('lam'))} | "
                 f"{_mean_sd(col('teacher'))} | {_mean_sd(col('ads_student'))} | "
                 f"{_mean_sd(col('temperature_student'))} | {_mean_sd(col('gap'))} | "
                 f"{_mean_sd(losses)}{'' if len(losses) == len(rows) else f' ({len(losses)})'} |")
  return "\n".join(lines) + "\n"


def attack_seeds_table(runs: dict[str, list[dict]]) -> str:
  """Mean ± sd over runs (seeds) of attack_rows, by attacker and ADS rank in lam; like
  seeds_table, a row counts only the seeds that have all its values."""
  attacks = sorted({r["attack"] for rows in runs.values() for r in rows})
  lines = ["| attacker | ADS point (by lam) | seeds | teacher acc | ADS student, unattacked | "
           "ADS student, attacked | temperature student | attacked ADS minus temperature | "
           "NLL: attacked ADS minus temperature |",
           "|---|---:|---|---|---|---|---|---|---|"]
  for attack in attacks:
    per_run = [sorted((r for r in rows if r["attack"] == attack and r.get("kind", "ads") == "ads"),
                      key=lambda x: x["lam"]) for rows in runs.values()]
    for k in range(max((len(r) for r in per_run), default=0)):
      rows, dropped = complete([r[k] for r in per_run if len(r) > k],
                               ("teacher", "unattacked_ads_student", "ads_student",
                                "temperature_student", "gap"))
      if not rows:
        continue
      col = lambda key: [r[key] for r in rows]
      losses = [r["loss_gap"] for r in rows if r.get("loss_gap") is not None]
      lines.append(f"| {attack} | {k + 1} | {len(rows)}{_left_out(dropped)} | "
                   f"{_mean_sd(col('teacher'))} | {_mean_sd(col('unattacked_ads_student'))} | "
                   f"{_mean_sd(col('ads_student'))} | "
                   f"{_mean_sd(col('temperature_student'))} ({rows[0]['against']}) | "
                   f"{_mean_sd(col('gap'))} | "
                   f"{_mean_sd(losses)}{'' if len(losses) == len(rows) else f' ({len(losses)})'} |")
  return "\n".join(lines) + "\n"


def seeds_figure(workdirs: dict[str, str], path) -> None:
  """Figure 3 with every seed: ADS and temperature series per seed, the undistilled students."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  markers = "osD^v<>"
  for i, (name, workdir) in enumerate(workdirs.items()):
    entries, base = collect(workdir)
    for kind, color in (("ads", "tab:red"), ("temperature", "tab:blue")):
      pts = sorted(((_acc(e, "student_eval"), _acc(e, "teacher_eval")) for e in entries
                    if e["point"]["kind"] == kind and _acc(e, "student_eval") is not None
                    and _acc(e, "teacher_eval") is not None), key=lambda p: p[1])  # along a sweep
      if pts:
        label = f"{'antidistillation' if kind == 'ads' else 'temperature'}, {name}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                color=color, alpha=0.7, label=label)
    if base is not None and _acc(base, "student_eval") is not None:
      ax.axvline(_acc(base, "student_eval"), color="gray", linestyle="--", alpha=0.6)
  ax.set_xlabel("distilled student accuracy (dashed: undistilled)")
  ax.set_ylabel("teacher accuracy")
  ax.set_title("Teacher vs distilled student, every seed")
  ax.legend(fontsize=6)
  fig.tight_layout()
  _save_png(fig, path)
  plt.close(fig)


def style_rows(workdir) -> list[dict]:
  """For the synthetic chains task: the writing choices in each point's training traces
  (`data.synthetic.style_summary`), all traces and the correct ones; [] for other tasks."""
  from antidistill_jax import traces
  from antidistill_jax.data import synthetic
  rows = []
  for e in collect(workdir)[0]:
    if not e.get("traces_path") or not epath.Path(e["traces_path"]).exists():
      continue
    path = epath.Path(e["traces_path"])
    if traces.read_meta(path)["config"]["dataset"] != "synthetic":
      return []
    got = traces.read_traces(path)
    for subset, chosen in (("all", got), ("correct", [r for r in got if r["correct"]])):
      summary = synthetic.style_summary([r["completion"] for r in chosen],
                                        [r["problem"] for r in chosen])
      rows.append(dict(point=e["name"], subset=subset, **summary))
  return rows


def style_table(rows: list[dict]) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lines = ["| trace set | traces | n | ';' separator | accumulator first |", "|---|---|---:|---:|---:|"]
  lines += [f"| {r['point']} | {r['subset']} | {r['traces']} | {fmt(r['semicolon'])} | "
            f"{fmt(r['accumulator_first'])} |" for r in rows]
  return "\n".join(lines) + "\n"


def write_seeds_report(workdirs: dict[str, str], out) -> dict:
  """out/seeds.md (each seed's matched table, then mean ± sd by ADS rank) and out/seeds.png
  from several experiment workdirs, e.g. {"seed 0": "runs/s0", ...}."""
  out = epath.Path(out)
  files.makedirs(out)
  runs = {name: matched(collect(w)[0]) for name, w in workdirs.items()}
  text = ["# ADS against temperature sampling at the same teacher accuracy, over seeds\n\n",
          seeds_table(runs)]
  attacked = {name: attack_rows(w) for name, w in workdirs.items()}
  if any(attacked.values()):
    text += ["\n## Attackers, over seeds\n\nEach attacker distils from the same ADS traces "
             "(antidistill_jax/attacks.py); the temperature students it is compared with are "
             "filtered the same way for the filters (keep_correct, reaimed), and plain for "
             "clean_mix.\n\n",
             attack_seeds_table(attacked)]
  for name, workdir in workdirs.items():
    entries, base = collect(workdir)
    text += [f"\n## {name} ({workdir})\n\n", table(entries, base), "\n", matched_table(runs[name])]
    if attacked[name]:
      text += ["\n", attack_table(attacked[name])]
    styles = style_rows(workdir)
    if styles:
      text += ["\nWriting choices in the training traces (`data.synthetic.style_summary`):\n\n",
               style_table(styles)]
  files.write_atomic(out / "seeds.md", "".join(text).encode("utf-8"))
  seeds_figure(workdirs, out / "seeds.png")
  return dict(table=str(out / "seeds.md"), figure=str(out / "seeds.png"))


if __name__ == "__main__":
  import sys
  if len(sys.argv) < 3:
    sys.exit("usage: python -m antidistill_jax.report OUT_DIR NAME=WORKDIR [NAME=WORKDIR ...]")
  print(write_seeds_report(dict(a.split("=", 1) for a in sys.argv[2:]), sys.argv[1]))
