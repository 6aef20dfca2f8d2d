"""Multi-host for real on one machine: two processes on 127.0.0.1, each with 4 CPU devices,
joined by jax.distributed (gloo collectives), run configs/tiny.py through the CLI on one global
8-device mesh. Their results must equal one process's with the same 8-device mesh."""

import glob
import json
import math
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", ANTIDISTILL_NO_PROGRESS="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _command(workdir, *flags):
  return [sys.executable, "-m", "antidistill_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", *flags]


def run_processes(workdirs, *flags) -> list[tuple[int, str]]:
  """Process i of 2 runs the CLI with workdirs[i]; returns each (exit code, output)."""
  port = _free_port()
  logs = [os.path.join(os.path.dirname(os.fspath(workdirs[0])), f"process{i}.log")
          for i in range(2)]
  procs = []
  for i in range(2):  # output to files: a full pipe would stall one process and hang both
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          _command(workdirs[i], "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", *flags),
          cwd=ROOT, env=_env(4), stdout=log, stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      p.kill()
  outs = []
  for code, log in zip(codes, logs):
    with open(log) as f:
      outs.append((code, f.read()))
  return outs


def results(workdir) -> dict:
  """Every trace row's tokens and grades, and every stage's metrics, by path under workdir."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "*", "*", "**", "*.jsonl"), recursive=True):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = [
          (r["index"], r["completion_ids"], r["correct"], r.get("forced_correct"))
          for r in map(json.loads, f)]
  for path in glob.glob(os.path.join(workdir, "records", "*", "*.json")):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = json.load(f)["metrics"]
  return out


def close(a, b) -> bool:
  """Equal, with floats equal to 1e-5 relative (reductions run in another order)."""
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
  return a == b


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  multi = str(tmp_path / "two_processes")
  procs = run_processes([multi, multi])
  for i, (code, out) in enumerate(procs):
    assert code == 0, f"process {i}:\n{out[-4000:]}"
  logs = []  # one log file per process in the workdir (main.route_logs)
  for path in glob.glob(os.path.join(multi, "logs", "*.log")):
    with open(path) as f:
      logs.append(f.read())
  assert len(logs) == 2 and any("process 1 of 2, 8 devices" in log for log in logs)

  single = str(tmp_path / "one_process")
  p = subprocess.run(_command(single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                     timeout=TIMEOUT_S)
  assert p.returncode == 0, p.stderr[-4000:]

  a, b = results(multi), results(single)
  # The same stage keys (content hashes of settings and model fingerprints), so the same
  # files; the same tokens in every trace and evaluation; metrics equal up to reduction order.
  assert sorted(a) == sorted(b) and len(a) > 20
  different = [k for k in a if not close(a[k], b[k])]
  assert not different, different
  # Process 0 alone wrote each record, once.
  writers = {json.load(open(p))["pid"] for p in glob.glob(os.path.join(multi, "records", "*",
                                                                          "*.json"))}
  assert len(writers) == 1


def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  procs = run_processes([str(tmp_path / "host0"), str(tmp_path / "host1")])
  for i, (code, out) in enumerate(procs):
    assert code != 0, f"process {i} ran on an unshared workdir"
    assert "workdir must be one folder they all see" in out, out[-3000:]
