"""A stage as data, and the one loop that runs every stage the same way.

For each item of a stage (a grid point, a student, or the stage's single output):
  1. key = stage.key(item): a hash of what decides the output (cheap: no model is built);
  2. a record under that key means the output is finished: reuse it;
  3. else claim the key (create-if-absent: one job across all shards wins), compute into
     workdir/<stage>/<key>/ and publish the record, which is the one finished-marker;
  4. a key another live job claimed is waited for (polling its record), up to
     config.pipeline.wait_timeout_s, then an error names the key, the claimant and the fix;
     in a stage whose items are independent (`Stage.independent`: students, evaluations) it
     is passed over first and waited for once the job's other items are done, so jobs on one
     workdir divide a stage's items between them instead of queueing behind each other.
With several processes in one job (--distributed), process 0 decides each step
(`parallel.agree`), every process computes (batches span them all), and process 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath

from antidistill_jax import errors, files, monitoring, parallel
from antidistill_jax.pipeline.store import Store

_RECORDED, _MINE, _WAIT, _EXPIRED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the experiment.

  name: also the folder of its outputs and records.
  items: what it runs over (grid points, (point, attack) students, or [None] for one output).
  key: item -> the hash of everything its output depends on (None: a derived output, such as
    the report, rewritten on every run and never recorded).
  compute: (item, out_dir) -> metrics (JSON-able); writes the item's outputs into out_dir.
  fields: item -> what the record says about the item besides its metrics (entry name, point).
  independent: no item reads another item's output, so items may finish in any order.
  """
  name: str
  items: Callable[[], Sequence[Any]]
  key: Callable[[Any], str] | None
  compute: Callable[[Any, epath.Path], dict]
  fields: Callable[[Any], dict] = lambda item: {}
  independent: bool = False


@dataclasses.dataclass
class Outcome:
  record: dict
  how: str  # "computed", "reused" or "waited"


def obtain(store: Store, stage: Stage, item: Any, key: str, *, timeout_s: float = 7200.0,
           poll_s: float = 2.0, wait: bool = True) -> Outcome | None:
  """The record of (stage, key): found, computed by this run, or waited for; None, without
  waiting, when another live job holds the key and `wait` is False."""
  deadline, waited, owner = time.time() + timeout_s, False, {}
  while True:
    status = _RECORDED
    if parallel.is_writer():
      if store.record(stage.name, key) is None:
        mine, owner = store.claim(stage.name, key)
        status = _MINE if mine else _EXPIRED if time.time() > deadline else _WAIT
    status = parallel.agree(status)  # process 0 decides: every process takes the same branch
    if status == _RECORDED:
      return Outcome(store.record(stage.name, key), "waited" if waited else "reused")
    if status == _MINE:
      out = store.out_dir(stage.name, key)
      if parallel.is_writer():
        files.makedirs(out)
      start = time.time()
      metrics = stage.compute(item, out)
      record = dict(stage.fields(item), seconds=round(time.time() - start, 3), metrics=metrics)
      if parallel.is_writer():
        store.publish(stage.name, key, record)
      parallel.sync(f"{stage.name} {key}")
      return Outcome(dict(record, stage=stage.name, key=key), "computed")
    if status == _WAIT and not wait:
      return None
    if status == _EXPIRED:
      owner = owner or {}
      raise errors.UserError(
          f"stage {stage.name}, key {key}: still not finished after {timeout_s:.0f} s; it is "
          f"claimed by run {owner.get('run')} (host {owner.get('host')}, pid {owner.get('pid')})"
          f" in {owner.get('path')}. If that job is gone, delete that claim file and rerun; if "
          "it is only slow, raise --config.pipeline.wait_timeout_s.")
    if not waited and parallel.is_writer():  # said once, where a person watching will see it
      logging.warning(
          "stage %s, key %s: another job is computing it (run %s, host %s, pid %s); waiting up "
          "to %.0f s (--config.pipeline.wait_timeout_s). If that job is gone, delete %s.",
          stage.name, key, owner.get("run"), owner.get("host"), owner.get("pid"), timeout_s,
          owner.get("path"))
    waited = True
    time.sleep(poll_s)


def run_stage(store: Store, stage: Stage, *, timeout_s: float = 7200.0, poll_s: float = 2.0,
              on_record: Callable[[Stage, Any, Outcome], None] | None = None) -> dict:
  """Runs every item of a stage; returns {computed, reused, waited, seconds} counts. One
  progress bar per stage (the items), one summary line when it ends."""
  start = time.time()
  items = list(stage.items())
  counts = dict(computed=0, reused=0, waited=0)
  with monitoring.progress(len(items), stage.name, unit="item", log_summary=False,
                           leave=False) as bar:
    held = []  # (item, key) another live job holds: waited for after the others

    def finish(item, outcome):
      counts[outcome.how] += 1
      if on_record is not None:
        on_record(stage, item, outcome)
      bar.update(1)

    for item in items:
      if stage.key is None:  # derived: always rewritten
        stage.compute(item, store.root / stage.name)
        counts["computed"] += 1
        bar.update(1)
        continue
      key = stage.key(item)
      outcome = obtain(store, stage, item, key, timeout_s=timeout_s, poll_s=poll_s,
                       wait=not stage.independent)
      if outcome is None:
        held.append((item, key))
      else:
        finish(item, outcome)
    for item, key in held:
      finish(item, obtain(store, stage, item, key, timeout_s=timeout_s, poll_s=poll_s))
  counts["seconds"] = round(time.time() - start, 3)
  done = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "seconds" and v)
  line = monitoring.stage_summary(stage.name, counts["seconds"], items=len(items))
  if parallel.is_writer():  # the terminal's one line per stage (logs go to a file)
    print(f"{line}{' (' + done + ')' if done else ''}", flush=True)
  return counts
