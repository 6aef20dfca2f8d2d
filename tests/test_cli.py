"""The command line's manners: a bad flag ends in one line naming it (no traceback, nothing
computed), and library logs go to a file in the workdir, not to the terminal."""

import glob
import os
import re
import subprocess
import sys

import pytest

from antidistill_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_LINE = re.compile(r"^I\d{4} ", re.M)  # absl's prefix of an INFO record


def _run(args, tmp_path, code=None, devices=1):
  """`python -m antidistill_jax.main ARGS` (or `python -c CODE ARGS`) on `devices` CPU devices:
  status, stdout, stderr."""
  xla = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env = dict(os.environ, ANTIDISTILL_NO_PROGRESS="1", XLA_FLAGS=xla, HF_HUB_OFFLINE="1",
             ANTIDISTILL_CACHE=str(tmp_path / "cache"))
  command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "antidistill_jax.main"]
  p = subprocess.run(command + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  return p.returncode, p.stdout, p.stderr


def _one_line(out: str, err: str) -> str:
  lines = [line.strip() for line in (out + err).splitlines() if line.strip()]
  assert "Traceback" not in out + err
  assert len(lines) == 1, lines
  return lines[0]


@pytest.mark.parametrize("flag,names", [
    ("--shard=3/2", ["--shard=3/2", "0 <= i < n"]),
    ("--shard=x", ["--shard=x", "e.g. --shard=0/4"]),
    ("--stages=holdout,bogus", ["--stages", "bogus", "models,holdout,grad"]),
    ("--config.sample.top_p=abc", ["--config.sample.top_p", "--helpshort"]),
])
def test_a_bad_flag_is_one_line_and_computes_nothing(tmp_path, flag, names):
  workdir = tmp_path / "run"
  status, out, err = _run(["--config=configs/tiny.py", f"--workdir={workdir}", flag], tmp_path)
  line = _one_line(out, err)
  assert status == main.USAGE_EXIT
  assert line.startswith("error: ")
  for name in names:
    assert name in line
  assert not workdir.exists()  # no log file either: flags are checked first


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  for workdir in (tmp_path / "file", tmp_path / "file" / "below"):
    (tmp_path / "file").write_text("not a folder")
    status, out, err = _run(["--config=configs/tiny.py", f"--workdir={workdir}"], tmp_path)
    line = _one_line(out, err)
    assert status == main.USAGE_EXIT
    assert f"--workdir={workdir}" in line and "pass a folder" in line
    assert (tmp_path / "file").read_text() == "not a folder"


# A `main` that routes the logs of a run in --workdir, logs at every level through absl and
# python logging (as orbax and jax do), then fails the way a stage finding no input does.
HARNESS = """
import logging, sys
from absl import flags, logging as absl_logging
from antidistill_jax import errors, main

def harness(argv):
  main.route_logs(flags.FLAGS.workdir)
  logging.getLogger("orbax.checkpoint").info("orbax info record")
  absl_logging.info("absl info record")
  logging.getLogger("jax").warning("jax warning record")
  absl_logging.debug("absl debug record")
  if sys.argv[-1] == "fail":
    raise errors.MissingInput("model directory '/no/such/dir' does not exist; pass "
                              "--config.models.teacher=DIR")
  if sys.argv[-1] == "interrupt":  # Ctrl-C in the middle of a stage
    raise KeyboardInterrupt

main.main = harness
main.run()
"""


def _log_file(workdir) -> str:
  [path] = glob.glob(os.path.join(workdir, "logs", "*.log"))
  assert re.fullmatch(r"\d{8}T\d{6}Z-.+-\d+\.log", os.path.basename(path))
  with open(path) as f:
    return f.read()


def test_info_records_go_to_the_log_file_not_the_terminal(tmp_path):
  status, out, err = _run([f"--workdir={tmp_path}"], tmp_path, HARNESS)
  assert status == 0, err
  assert "jax warning record" in err
  assert "info record" not in err and "debug record" not in err
  log = _log_file(tmp_path)
  for record in ("orbax info record", "absl info record", "jax warning record"):
    assert record in log
  assert "debug record" not in log


@pytest.mark.parametrize("verbosity,shown", [("--verbosity=0", "info"), ("-v=1", "debug")])
def test_verbosity_brings_them_to_the_terminal(tmp_path, verbosity, shown):
  status, out, err = _run([f"--workdir={tmp_path}", verbosity], tmp_path, HARNESS)
  assert status == 0, err
  assert "orbax info record" in err and "absl info record" in err
  assert ("absl debug record" in err) == (shown == "debug")
  assert "orbax info record" in _log_file(tmp_path)


def test_a_gs_workdir_gets_the_log_at_exit(tmp_path):
  (tmp_path / "gcs" / "bucket").mkdir(parents=True)
  fake = (f"import sys; sys.path.insert(0, 'tests'); import fake_gcs; "
          f"fake_gcs.register({str(tmp_path / 'gcs')!r})\n")
  status, out, err = _run(["--workdir=gs://bucket/run"], tmp_path, fake + HARNESS)
  assert status == 0, err
  [local] = glob.glob(str(tmp_path / "cache" / "logs" / "*.log"))  # written here, then copied
  with open(local) as f:
    assert f.read() == _log_file(tmp_path / "gcs" / "bucket" / "run")


def test_an_error_raised_in_the_run_is_one_line_with_its_traceback_in_the_log(tmp_path):
  status, out, err = _run([f"--workdir={tmp_path}", "fail"], tmp_path, HARNESS)
  err = "\n".join(line for line in err.splitlines() if "jax warning record" not in line)
  line = _one_line(out, err)
  assert status == main.USAGE_EXIT
  assert line == ("error: model directory '/no/such/dir' does not exist; pass "
                  "--config.models.teacher=DIR")
  log = _log_file(tmp_path)
  assert "Traceback" in log and "MissingInput" in log


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path):
  status, out, err = _run([f"--workdir={tmp_path}", "interrupt"], tmp_path, HARNESS)
  err = "\n".join(line for line in err.splitlines() if "jax warning record" not in line)
  assert status == main.INTERRUPTED_EXIT == 130
  assert _one_line(out, err).startswith("interrupted: what finished is kept in the workdir; "
                                        "run the same command again to resume")
  assert "KeyboardInterrupt" in _log_file(tmp_path)


def test_the_experiment_prints_where_its_log_is_and_no_info_records(tmp_path):
  workdir = tmp_path / "run"
  status, out, err = _run(["--config=configs/tiny.py", f"--workdir={workdir}",
                           "--stages=models"], tmp_path)
  assert status == 0, err
  [path] = glob.glob(os.path.join(workdir, "logs", "*.log"))
  assert f"log {path}" in err
  assert not INFO_LINE.search(out + err)
  assert INFO_LINE.search(_log_file(workdir))  # jax's and the stage's records are there


def test_a_mesh_that_does_not_fit_the_devices_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  status, out, err = _run(["--config=configs/tiny.py", f"--workdir={workdir}",
                           "--config.mesh.model=3"], tmp_path, devices=8)
  assert status == main.USAGE_EXIT
  line = [line for line in err.splitlines() if line.startswith("error: ")]
  assert line == ["error: --config.mesh.data=-1 --config.mesh.model=3: 8 devices do not split "
                  "into model=3 groups. Set --config.mesh.model to a divisor of the device "
                  "count and --config.mesh.data=-1 (every other device)."]
  assert "Traceback" not in out + err


def test_a_missing_checkpoint_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  status, out, err = _run(["--config=configs/tiny.py", f"--workdir={workdir}",
                           "--config.tiny.enabled=False", "--config.models.teacher=/no/such/dir"],
                          tmp_path)
  assert status == main.USAGE_EXIT
  # Where the log is and the stages that finished (none computed anything), then the error.
  lines = [line.strip() for line in (out + err).splitlines() if line.strip()]
  assert "Traceback" not in out + err
  assert err.startswith("workdir ") and not INFO_LINE.search(out + err)
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
  assert "/no/such/dir" in lines[-1] and "--config.models.teacher" in lines[-1]
  computed = [name for _, _, names in os.walk(workdir) for name in names
              if name.endswith((".jsonl", ".safetensors")) or "orbax" in name]
  assert not computed
  assert "MissingInput" in _log_file(workdir)  # the traceback behind the line
