"""The experiment's report from whatever results exist: the paper's Figure 3 and Figure 5 and a
table of every point.

  write_report(workdir)   # workdir/report/{figure3.png, figure5.png, results.md, results.json}

It reads workdir/index/<point>.json, which the pipeline's stages fill as they finish (a point
may lack some fields: a partial grid still reports what it has) and index/base.json (the
undistilled student).
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


def _read(path) -> Any:
  return files.read_json(path)


def _save_png(fig, path) -> None:
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  files.write_atomic(path, png.getvalue())


def collect(workdir) -> tuple[list[dict], dict | None]:
  """(point entries sorted by kind, tau, lam; the base entry or None)."""
  entries, base = [], None
  index = epath.Path(workdir) / "index"
  for path in sorted(p for p in (index.iterdir() if index.exists() else []) if p.suffix == ".json"):
    entry = _read(path)
    if path.name == "base.json":
      base = entry
    elif "point" in entry:
      entries.append(entry)
  entries.sort(key=lambda e: (e["point"]["kind"], e["point"]["tau"], e["point"]["lam"]))
  return entries, base


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


def figure3(entries: list[dict], base: dict | None, path: str, forced: bool = False) -> bool:
  """Teacher against student accuracy; False (no file) when no point has both."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = {"ads": ([], [], []), "temperature": ([], [], [])}
  for e in entries:
    t, s = _acc(e, "teacher_eval", forced), _acc(e, "student_eval", forced)
    if t is None or s is None:
      continue
    p = e["point"]
    xs, ys, labels = series[p["kind"]]
    xs.append(s)
    ys.append(t)
    labels.append(f"λ={p['lam']:.3g}" if p["kind"] == "ads" else f"τ={p['tau']:.3g}")
  if not any(xs for xs, _, _ in series.values()):
    return False
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  styles = {"ads": dict(marker="o", color="tab:red", label="antidistillation"),
            "temperature": dict(marker="s", color="tab:blue", label="temperature")}
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
    label = (f"ADS λ={p['lam']:.3g}" if p["kind"] == "ads" else f"temp τ={p['tau']:.3g}")
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


def write_report(workdir) -> dict:
  """Writes workdir/report/ (local or gs://) from the index; returns {what: path} of the files
  written."""
  entries, base = collect(workdir)
  out = epath.Path(workdir) / "report"
  files.makedirs(out)
  written = {}
  md = out / "results.md"
  files.write_atomic(md, table(entries, base).encode("utf-8"))
  written["table"] = str(md)
  files.write_json(out / "results.json", dict(points=entries, base=base))
  for name, make in (("figure3", lambda p: figure3(entries, base, p)),
                     ("figure3_forced", lambda p: figure3(entries, base, p, forced=True)),
                     ("figure5", lambda p: figure5(entries, p))):
    path = out / f"{name}.png"
    if make(path):
      written[name] = str(path)
  return written
