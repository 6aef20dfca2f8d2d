"""launch/tpu.sh and launch/gpu.sh, checked through --dry-run with a fake gcloud first on PATH.

The fake records every call; dry runs must leave its record empty. The `run` command's remote
shell line is also executed locally (HOME in a temp dir, a fake venv python) to check that the
user's flags reach the program intact, through both levels of shell quoting.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
GPU = os.path.join(ROOT, "launch", "gpu.sh")
FLAGS = ["--config=configs/gsm8k_paper.py", "--workdir=gs://b/run",
         "--config.system_prompt=Think step by step, then say \"done\".",
         "--config.note=it's $HOME `hostname` & more", "--stages=generate,distill"]
SLICE = {"TPU_NAME": "ads-v5e-32", "ZONE": "us-west4-a", "PROJECT": "my-proj"}


@pytest.fixture
def env(tmp_path):
  """A clean environment whose PATH starts with a recording fake gcloud (and python3/pip)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.jsonl"
  for name in ("gcloud", "python3", "pip"):
    fake = bin_dir / name
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n")
    fake.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
          "TMPDIR": str(tmp_path), "LC_ALL": "C", **SLICE}


def calls(env):
  path = os.path.join(env["HOME"], "calls.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def sh(script, *args, env, ok=True, **extra):
  p = subprocess.run(["bash", script, *args], env={**env, **extra}, capture_output=True,
                     text=True, timeout=30)
  assert (p.returncode == 0) == ok, (p.returncode, p.stdout, p.stderr)
  return p


def dry(*args, env, **extra):
  """The commands tpu.sh --dry-run prints, each split back into its argv; nothing ran."""
  out = sh(TPU, "--dry-run", *args, env=env, **extra).stdout
  assert calls(env) == []
  return [shlex.split(line) for line in out.splitlines()]


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v2-alpha-tpuv5-lite"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_picks_the_runtime_version_per_generation(env, accelerator, version):
  [argv] = dry("create", env=env, ACCELERATOR_TYPE=accelerator)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ads-v5e-32"]
  assert flag(argv, "--accelerator-type") == accelerator
  assert flag(argv, "--version") == version
  assert flag(argv, "--zone") == "us-west4-a" and flag(argv, "--project") == "my-proj"
  assert "--spot" not in argv


def test_create_runtime_override_and_unknown_generation(env):
  [argv] = dry("create", env=env, ACCELERATOR_TYPE="v6e-8", RUNTIME_VERSION="v2-alpha-tpuv6e-x")
  assert flag(argv, "--version") == "v2-alpha-tpuv6e-x"
  p = sh(TPU, "--dry-run", "create", env=env, ok=False, ACCELERATOR_TYPE="v9-8")
  assert "RUNTIME_VERSION" in p.stderr and p.stdout == ""


def test_create_through_a_queued_resource(env):
  [argv] = dry("create", env=env, ACCELERATOR_TYPE="v5p-8", QUEUED="1", SPOT="1",
               CREATE_FLAGS="--reserved --network=net")
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ads-v5e-32"]
  assert flag(argv, "--node-id") == "ads-v5e-32"
  assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5"
  assert {"--spot", "--reserved", "--network=net"} <= set(argv)
  [argv] = dry("create", env=env, ACCELERATOR_TYPE="v5p-8", QUEUED="1", QUEUED_RESOURCE="qr")
  assert argv[5] == "qr" and flag(argv, "--node-id") == "ads-v5e-32" and "--spot" not in argv


def test_setup_ships_the_checkout_and_installs_jax_tpu_on_every_worker(env, tmp_path):
  tar, scp, rm, ssh = dry("setup", env=env)
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", ROOT, "."] and "--exclude=.venv" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == tar[2] and scp[6] == "ads-v5e-32:antidistill_jax.tgz"
  assert rm == ["rm", "-f", tar[2]]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ads-v5e-32"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  remote = flag(ssh, "--command")
  assert "'jax[tpu]'" in remote and "pip install" in remote and "-e '.[gcs]'" in remote
  assert not list(tmp_path.glob("*.tgz"))  # the dry run built no tarball


def test_run_starts_the_same_detached_command_on_all_workers(env):
  [ssh] = dry("run", *FLAGS, env=env)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ads-v5e-32"]
  assert "--worker=all" in ssh
  remote = flag(ssh, "--command")
  assert ("python -m antidistill_jax.main --distributed --config=configs/gsm8k_paper.py "
          "--workdir=gs://b/run") in remote
  assert "nohup" in remote and ">> ~/antidistill_run.log 2>&1" in remote


def test_run_remote_line_passes_flags_intact_and_runs_once(env, tmp_path):
  """Execute the remote line here as a worker would: the fake python sees exactly FLAGS."""
  venv = tmp_path / "antidistill_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$HOME/argv"\nexec sleep 30\n')
  (venv / "python").chmod(0o755)
  [ssh] = dry("run", *FLAGS, env=env)
  [stop] = dry("stop", env=env)
  remote = lambda argv: subprocess.run(["bash", "-c", flag(argv, "--command")], env=env,
                                       capture_output=True, text=True, timeout=30)
  pid_file = tmp_path / "antidistill_run.pid"
  try:
    assert remote(ssh).returncode == 0
    deadline = time.time() + 10
    while not (tmp_path / "argv").exists() and time.time() < deadline:
      time.sleep(0.05)
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["-m", "antidistill_jax.main", "--distributed", *FLAGS]
    second = remote(ssh)  # one run at a time: the first still holds the TPU
    assert second.returncode == 1 and "still going" in second.stderr
    log = (tmp_path / "antidistill_run.log").read_text()
    assert log.startswith("=== ") and "--workdir=gs://b/run" in log.splitlines()[0]
    assert remote(stop).returncode == 0 and not pid_file.exists()
  finally:
    if pid_file.exists():
      os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_logs_follow_one_worker_or_show_all(env):
  [argv] = dry("logs", env=env)
  assert "--worker=0" in argv and "tail -n 200 -F ~/antidistill_run.log" in flag(argv, "--command")
  [argv] = dry("logs", "3", env=env)
  assert "--worker=3" in argv
  [argv] = dry("logs", "all", env=env, LOG_LINES="5")
  assert "--worker=all" in argv and "tail -n 5 " in flag(argv, "--command")
  assert "worker number" in sh(TPU, "--dry-run", "logs", "x", env=env, ok=False).stderr


def test_delete_the_slice_or_the_queued_resource(env):
  [argv] = dry("delete", env=env)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ads-v5e-32"]
  [argv] = dry("delete", env=env, QUEUED="1")
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ads-v5e-32"]
  assert "--force" in argv


@pytest.mark.parametrize("missing, command", [
    ("TPU_NAME", "run"), ("ZONE", "setup"), ("ACCELERATOR_TYPE", "create")])
def test_missing_settings_fail_naming_the_fix(env, missing, command):
  env = {k: v for k, v in env.items() if k != missing}
  p = sh(TPU, "--dry-run", command, env=env, ok=False)
  assert p.returncode == 2 and f"{missing} is not set; export {missing}=" in p.stderr
  assert p.stdout == "" and calls(env) == []


def test_dry_run_from_the_environment_and_usage(env):
  p = sh(TPU, "delete", env=env, DRY_RUN="1")
  assert p.stdout.startswith("gcloud compute tpus tpu-vm delete") and calls(env) == []
  assert "usage:" in sh(TPU, "--help", env=env).stdout
  assert "usage:" in sh(TPU, "--dry-run", "launch", env=env, ok=False).stderr
  assert "usage:" in sh(TPU, env=env, ok=False).stderr


def test_without_dry_run_gcloud_gets_what_the_dry_run_printed(env):
  """One `run` wrapper builds both paths: the fake gcloud receives the printed argv."""
  for args, extra in [(("create",), {"ACCELERATOR_TYPE": "v6e-8", "QUEUED": "1"}),
                      (("run", *FLAGS), {}), (("delete",), {})]:
    [printed] = dry(*args, env=env, **extra)
    sh(TPU, *args, env=env, **extra)
    [called] = calls(env)
    assert called[0].endswith("/gcloud") and called[1:] == printed[1:]
    os.remove(os.path.join(env["HOME"], "calls.jsonl"))


def test_gpu_dry_run(env):
  out = sh(GPU, "--dry-run", "setup", env=env).stdout
  assert [shlex.split(line) for line in out.splitlines()] == [
      ["cd", ROOT], ["python3", "-m", "venv", ".venv"],
      [".venv/bin/pip", "install", "-q", "-U", "pip"],
      [".venv/bin/pip", "install", "-q", "-e", ".[gcs]", "jax[cuda12]"]]
  out = sh(GPU, "run", *FLAGS, env=env, DRY_RUN="1").stdout
  assert [shlex.split(line) for line in out.splitlines()] == [
      ["cd", ROOT], [".venv/bin/python", "-m", "antidistill_jax.main", *FLAGS]]
  assert calls(env) == []
  assert "usage:" in sh(GPU, "--dry-run", env=env, ok=False).stderr
