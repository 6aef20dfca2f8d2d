"""The workdir store under concurrent jobs: records written once by many processes at once are
all there and whole, on a local disk and on the gs:// test double; a key is claimed by exactly
one job; a claim whose process died is taken over; a claim held elsewhere ends in an error that
names the key once the wait runs out; an old workdir is refused."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest

from antidistill_jax import errors, files
from antidistill_jax.pipeline import loop
from antidistill_jax.pipeline.store import Store

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# One writer process: waits for the start file, then publishes its own records and tries to
# claim every shared key, and prints the keys it won. It exits only when told to (a dead
# claimant's key may be taken over, which is another test).
WORKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    workdir, me, n, shared, gcs_root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5]
    if gcs_root:
      import fake_gcs
      fake_gcs.register(gcs_root)
    from antidistill_jax.pipeline.store import Store
    store = Store(workdir)
    while not os.path.exists(os.path.join({start!r})):
      time.sleep(0.01)
    won = []
    for i in range(n):
      payload = dict(writer=me, i=i, text="x" * (i * 37 % 5000))
      assert store.publish("sample", f"w{{me}}_{{i:04d}}", dict(metrics=payload))
      if i < shared:
        if store.claim("grad", f"shared{{i}}")[0]:
          won.append(i)
          store.publish("grad", f"shared{{i}}", dict(metrics=dict(writer=me)))
    print(json.dumps(won), flush=True)
    sys.stdin.read()  # stay alive until the test has looked at the claims
""")


def _race(tmp_path, workdir, writers=4, n=200, shared=50, gcs_root=""):
  start = tmp_path / "start"
  script = WORKER.format(tests=TESTS, root=ROOT, start=str(start))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, workdir, str(w), str(n), str(shared),
                             gcs_root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
           for w in range(writers)]
  start.write_text("go")
  won = []
  for p in procs:
    won.append(json.loads(p.stdout.readline() or "null"))
  for p in procs:
    _, err = p.communicate("", timeout=120)
    assert p.returncode == 0, err[-3000:]
  return won


@pytest.mark.parametrize("where", ["local", "gs"])
def test_concurrent_writers_lose_no_record_and_tear_none(tmp_path, where):
  gcs_root = ""
  if where == "gs":
    import fake_gcs
    gcs_root = str(tmp_path / "gcs")
    os.makedirs(os.path.join(gcs_root, "bucket"))
    fake_gcs.register(gcs_root)
    workdir = "gs://bucket/run"
  else:
    workdir = str(tmp_path / "run")
  won = _race(tmp_path, workdir, gcs_root=gcs_root)
  store = Store(workdir)
  records = store.records("sample")
  assert len(records) == 4 * 200  # none lost
  seen = {(r["metrics"]["writer"], r["metrics"]["i"]) for r in records}
  assert seen == {(w, i) for w in range(4) for i in range(200)}
  assert all(r["metrics"]["text"] == "x" * (r["metrics"]["i"] * 37 % 5000) for r in records)
  # Every shared key: exactly one writer claimed it, and its record is that writer's.
  winners = {}
  for w, keys in enumerate(won):
    for i in keys:
      assert i not in winners, f"key shared{i} claimed by writers {winners[i]} and {w}"
      winners[i] = w
  assert sorted(winners) == list(range(50))
  assert {int(r["key"][len("shared"):]): r["metrics"]["writer"]
          for r in store.records("grad")} == winners


def test_a_record_is_written_once(tmp_path):
  store = Store(str(tmp_path))
  assert store.publish("grad", "k", dict(metrics=dict(a=1)))
  assert not store.publish("grad", "k", dict(metrics=dict(a=2)))
  assert store.record("grad", "k")["metrics"] == dict(a=1)
  assert not [p for p in os.listdir(tmp_path / "records" / "grad") if "tmp" in p]


def test_a_dead_claimant_is_taken_over_and_a_live_one_waited_for(tmp_path):
  store = Store(str(tmp_path))
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  claim = tmp_path / "claims" / "grad" / "k.0.json"
  claim.parent.mkdir(parents=True)
  claim.write_text(json.dumps(dict(run="old", host=store.host, pid=int(dead.stdout))))
  assert store.claim("grad", "k") == (True, None)  # the killed run's key is ours now
  assert (tmp_path / "claims" / "grad" / "k.1.json").exists()

  other = tmp_path / "claims" / "grad" / "busy.0.json"
  other.write_text(json.dumps(dict(run="r1", host="another-host", pid=1)))
  mine, owner = store.claim("grad", "busy")
  assert not mine and owner["host"] == "another-host"
  stage = loop.Stage("grad", lambda: [None], lambda _: "busy",
                     lambda _, out: pytest.fail("computed a key another job holds"))
  with pytest.raises(errors.UserError, match=r"stage grad, key busy: still not finished after "
                                             r".*another-host.*busy\.0\.json.*wait_timeout_s"):
    with mock.patch.object(loop.logging, "warning") as warning:
      loop.run_stage(store, stage, timeout_s=0.3, poll_s=0.05)
  # the wait is said once, at its start: whose job, how long, what to delete if it is gone
  [(args, _)] = warning.call_args_list
  said = args[0] % args[1:]
  assert said.startswith("stage grad, key busy: another job is computing it (run r1, host "
                         "another-host, pid 1); waiting up to 0 s")
  assert said.endswith(f"If that job is gone, delete {other}.")
  # Once the other job records it, the waiter takes its record and computes nothing.
  files.create_new(store.record_path("grad", "busy"), json.dumps(dict(metrics={})).encode())
  counts = loop.run_stage(store, stage, timeout_s=5, poll_s=0.05)
  assert counts["reused"] == 1 and counts["computed"] == 0


def test_jobs_divide_an_independent_stages_items(tmp_path):
  """A stage whose items read none of each other's outputs (students, evaluations): an item
  another live job holds is passed over and taken up once this job's other items are done, so
  two jobs on one workdir share the items. A stage of dependent items keeps its order."""
  store = Store(str(tmp_path))
  held = tmp_path / "claims" / "distill" / "k0.0.json"
  held.parent.mkdir(parents=True)
  held.write_text(json.dumps(dict(run="r1", host="another-host", pid=1)))
  done = []

  def compute(item, out):
    done.append(item)
    if len(done) == 2:  # meanwhile, the other job finishes the item it holds
      files.create_new(store.record_path("distill", "k0"), json.dumps(dict(metrics={})).encode())
    return {}
  dependent = loop.Stage("distill", lambda: [0, 1, 2], lambda i: f"k{i}", compute)
  with pytest.raises(errors.UserError, match="key k0: still not finished"):
    loop.run_stage(store, dependent, timeout_s=0.3, poll_s=0.05)
  assert done == []  # it waited for item 0, in order
  independent = loop.Stage("distill", lambda: [0, 1, 2], lambda i: f"k{i}", compute,
                           independent=True)
  counts = loop.run_stage(store, independent, timeout_s=5, poll_s=0.05)
  assert done == [1, 2] and counts["computed"] == 2 and counts["reused"] == 1
  assert all(store.record("distill", f"k{i}") is not None for i in range(3))


def test_an_old_workdir_or_a_file_is_refused(tmp_path):
  old = tmp_path / "old"
  (old / "sample" / "abc").mkdir(parents=True)
  (old / "runs.jsonl").write_text("{}\n")
  with pytest.raises(errors.BadWorkdir, match=r"older antidistill_jax.*new --workdir.*"
                                              r"--migrate_keys"):
    Store(str(old)).open()
  assert sorted(os.listdir(old)) == ["runs.jsonl", "sample"]  # nothing written there
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(errors.BadWorkdir, match="is a file; pass a folder"):
    Store(str(afile)).open()
  fresh = tmp_path / "fresh"
  Store(str(fresh)).open()
  Store(str(fresh)).open()  # a workdir of this layout opens again
  assert json.loads((fresh / "layout.json").read_text()) == {"layout": 2}


def _layout1_config():
  """configs/tiny.py as tests/fixtures/layout1_workdir.tar.gz was made with it."""
  from configs import tiny
  c = tiny.get_config()
  for role in ("teacher", "proxy", "student"):
    c.tiny[role].hidden_size, c.tiny[role].intermediate_size = 16, 32
  c.grid.temperatures = (1.0,)
  return c


def test_migrate_keys_moves_an_old_workdirs_finished_outputs(tmp_path, monkeypatch):
  """tests/fixtures/layout1_workdir.tar.gz: a workdir the previous layout wrote (commit 9e187c9:
  `python -m antidistill_jax.main --config=configs/tiny.py` with the four overrides of
  _layout1_config; tensorboard/, report/, index/, checkpoints and distilled weights removed to
  keep it small). It is refused as it is; --migrate_keys moves every output to the new keys,
  after which nothing is recomputed and no model is built."""
  import tarfile
  from antidistill_jax import models, pipeline
  with tarfile.open(os.path.join(TESTS, "fixtures", "layout1_workdir.tar.gz")) as tar:
    # Our own fixture; the "data" filter where this Python has it (3.11.4+, 3.12+).
    tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
  workdir = str(tmp_path / "layout1_workdir")
  experiment = pipeline.Experiment(_layout1_config(), workdir)
  with pytest.raises(errors.BadWorkdir, match="--migrate_keys"):
    experiment.run()
  moved = experiment.migrate_keys()
  assert moved == dict(models=1, holdout=1, grad=1, sample=2, distill=2, eval_student=2,
                       eval_teacher=2, eval_base=1)
  assert not list((tmp_path / "layout1_workdir").glob("*/*/done.json"))  # one marker format
  monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: pytest.fail("model built"))
  counts = pipeline.Experiment(_layout1_config(), workdir).run()
  assert all(c["computed"] == 0 for s, c in counts.items() if s != "report"), counts
  assert sum(c["reused"] for c in counts.values()) == 12
  table = (tmp_path / "layout1_workdir" / "report" / "results.md").read_text()
  assert "ads_tau1_lam3" in table and "temperature_tau1_lam0" in table
