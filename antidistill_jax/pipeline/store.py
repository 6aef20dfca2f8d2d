"""The workdir: stage outputs found by key, each finished output recorded once, never edited.

  workdir/                      local or gs:// (every path goes through etils.epath)
    layout.json                 the layout's version, written once; an older workdir lacks it
    <stage>/<key>/              a stage's output folder (and its resumable partial work)
    records/<stage>/<key>.json  the output is finished: stage, key, fields, metrics, who, when
    claims/<stage>/<key>.<n>.json   which job computes the key now (n > 0: taken over)
    runs/<time>-<host>-<pid>-<r>.json  one summary per run of the command
    index/, report/             derived from the records by the report stage
    logs/, tensorboard/         per-process log files and scalars

Several jobs (independent `--shard` hosts, a rerun beside a run) may share a workdir. Nothing
is read, modified and written back: every record and claim is created once with
files.create_new (the first writer wins, readers never see half a file), and listings (the
registry, the report's index) are derived by listing folders. A key's output folder is
written by the job that holds its claim; a killed job's folder keeps its partial work, which
the next claimant resumes.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from etils import epath

from antidistill_jax import errors, files

LAYOUT = 2  # 1: runs.jsonl, index/ merged in place, done.json markers, keys hashing weights


def key_of(**parts) -> str:
  """A short hash of JSON-able parts (sorted keys): the identity of a stage output."""
  import hashlib
  blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def check_workdir(workdir: str) -> None:
  """errors.BadWorkdir when a local workdir cannot be a folder (it, or a folder above it, is a
  file). Nothing is created."""
  if not files.is_local(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise errors.BadWorkdir(f"--workdir={workdir}: {path} is a file; pass a folder (a new one, "
                            "or an earlier run's to resume it).")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


class Store:
  """One workdir's records and claims. Only the writing process (process 0) calls the methods
  that write; the stage loop decides for the others (`loop.run_stage`)."""

  def __init__(self, workdir, *, run_id: str | None = None):
    self.root = epath.Path(workdir)
    self.host, self.pid = socket.gethostname(), os.getpid()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    self.run_id = run_id or f"{stamp}-{self.host}-{self.pid}-{uuid.uuid4().hex[:6]}"

  # -- layout ---------------------------------------------------------------------------------

  def open(self) -> None:
    """Checks that the workdir is a folder of this layout (or empty), and marks it."""
    path = os.fspath(self.root)
    check_workdir(path)
    marker = self.root / "layout.json"
    if marker.exists():
      version = files.read_json(marker).get("layout")
      if version != LAYOUT:
        raise errors.BadWorkdir(
            f"--workdir={path} has layout {version}, this code writes layout {LAYOUT}: use "
            "another --workdir, or the version of antidistill_jax that wrote it.")
      return
    old = [name for name in ("runs.jsonl", "index", "holdout", "sample", "distill")
           if (self.root / name).exists()]
    if old:
      raise errors.BadWorkdir(
          f"--workdir={path} was written by an older antidistill_jax (it has {', '.join(old)} "
          "but no layout.json): its keys hashed loaded weights and included settings that do "
          "not change outputs, so none of its outputs would be found, and nothing there is "
          "recomputed silently. Either rerun in a new --workdir, or pass --migrate_keys to "
          "move its finished outputs to the new keys.")
    files.makedirs(self.root)
    files.create_new(marker, json.dumps(dict(layout=LAYOUT)).encode() + b"\n")

  # -- outputs and records --------------------------------------------------------------------

  def out_dir(self, stage: str, key: str) -> epath.Path:
    return self.root / stage / key

  def record_path(self, stage: str, key: str) -> epath.Path:
    return self.root / "records" / stage / f"{key}.json"

  def record(self, stage: str, key: str) -> dict | None:
    """The record of a finished output, or None."""
    path = self.record_path(stage, key)
    return files.read_json(path) if path.exists() else None

  def publish(self, stage: str, key: str, record: dict) -> bool:
    """Records a finished output, once: False if another job recorded it first."""
    record = dict(record, stage=stage, key=key, run=self.run_id, host=self.host, pid=self.pid,
                  finished=time.time())
    blob = (json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n").encode()
    return files.create_new(self.record_path(stage, key), blob)

  def records(self, stage: str | None = None) -> list[dict]:
    """The registry: every record (of one stage, or all), oldest first."""
    root = self.root / "records"
    stages = [stage] if stage else sorted(p.name for p in root.iterdir()) if root.exists() else []
    out = []
    for s in stages:
      folder = root / s
      if folder.exists():
        out += [files.read_json(p) for p in folder.iterdir() if p.name.endswith(".json")]
    return sorted(out, key=lambda r: (r.get("finished", 0), r["stage"], r["key"]))

  # -- claims ---------------------------------------------------------------------------------

  def _claims(self, stage: str, key: str) -> list[tuple[int, epath.Path]]:
    folder = self.root / "claims" / stage
    if not folder.exists():
      return []
    out = []
    for p in folder.iterdir():
      head, _, rest = p.name.partition(f"{key}.")
      if head == "" and rest.endswith(".json") and rest[:-5].isdigit():
        out.append((int(rest[:-5]), p))
    return sorted(out)

  def claim(self, stage: str, key: str) -> tuple[bool, dict | None]:
    """(True, None) if this run may compute the key: nobody claimed it, this run did, or the
    claimant was a process of this host that is gone (a killed run; its claim is taken over
    by creating the next generation). Else (False, the claimant)."""
    me = dict(run=self.run_id, host=self.host, pid=self.pid, time=time.time())
    claims = self._claims(stage, key)
    n = claims[-1][0] + 1 if claims else 0
    if claims:
      owner = files.read_json(claims[-1][1])
      if owner.get("run") == self.run_id:
        return True, None
      pid = int(owner.get("pid", -1))
      # Alive elsewhere: wait. Gone (or this very process, whose earlier run stopped): take over.
      if owner.get("host") != self.host or (pid != self.pid and _pid_alive(pid)):
        return False, dict(owner, path=os.fspath(claims[-1][1]))
    path = self.root / "claims" / stage / f"{key}.{n}.json"
    if files.create_new(path, json.dumps(me).encode() + b"\n"):
      return True, None
    return self.claim(stage, key)  # another job created it first: look again

  def write_run(self, summary: dict[str, Any]) -> None:
    """This run's summary, under a name no other run uses."""
    files.makedirs(self.root / "runs")
    files.create_new(self.root / "runs" / f"{self.run_id}.json",
                     (json.dumps(summary, indent=2, default=str) + "\n").encode())

  def runs(self) -> list[dict]:
    folder = self.root / "runs"
    paths = sorted(folder.iterdir()) if folder.exists() else []
    return [files.read_json(p) for p in paths if p.name.endswith(".json")]
