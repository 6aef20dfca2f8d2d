"""The sampling demo, configs/generate.py (the README's main job, configs/quick.py, runs at
reduced size in tests/test_notebooks.py; configs/synthetic.py in
tests/test_pipeline.py::test_the_synthetic_config_runs_at_reduced_size)."""

import json
import os
import re

import pytest

from antidistill_jax import errors, main
from configs import generate as generate_config


def test_main_job_builds_a_tiny_teacher_and_generates(tmp_path, capsys):
  config = generate_config.get_config()
  assert config.job == "generate"
  config.generate.workdir = str(tmp_path)
  config.sample.max_new_tokens = 6
  texts = main.run_generate(config)
  (ads_name,) = [k for k in texts if k.startswith("antidistilled (lam=")]
  plain, ads = texts["plain"], texts[ads_name]
  assert len(plain) == len(ads) == len(config.generate.problems)
  assert plain != ads  # same seed: only the perturbation differs
  assert os.path.exists(tmp_path / "tiny_teacher" / "model.safetensors")
  assert os.path.exists(tmp_path / "tiny_proxy" / "model.safetensors")
  out = capsys.readouterr().out
  lam = float(ads_name.split("lam=")[1].split(",")[0])  # calibrated: generate.logprob_drop
  assert f"lam {lam:.4g}: the teacher's mean log-prob per token drops by" in out
  assert f"===== {ads_name}: lam {lam:g}, " in out and "tokens/s" in out
  assert f"\n{plain[0]}\n(mean teacher log-prob" in out  # the text as it reads, not its repr
  rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
  assert [(r["mode"], r["lam"]) for r in rows] == [("plain", 0.0)] * 2 + [("antidistilled", lam)] * 2
  assert [r["text"] for r in rows] == plain + ads
  assert all(r["teacher_logprob"] < 0 for r in rows)
  # A second run loads the same checkpoints and, with the same seed, says the same.
  assert main.run_generate(config) == texts


def test_the_demo_terminal_shows_text_and_its_log_file_the_library_lines(tmp_path):
  import glob
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "antidistill_jax.main", "--config=configs/generate.py",
       f"--config.generate.workdir={tmp_path}", "--config.sample.max_new_tokens=4",
       "--config.generate.logprob_drop=0"], cwd=root, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, XLA_FLAGS=""))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "===== plain" in proc.stdout and "samples:" in proc.stdout
  assert "generated 2/2 prompts" not in proc.stderr  # INFO: the log file's, not the terminal's
  (log,) = glob.glob(str(tmp_path / "logs" / "*.log"))
  text = open(log).read()
  assert "generated 2/2 prompts" in text
  assert "jax cpu backend" in text and "Unable to initialize backend" not in text


def test_the_demo_takes_g_from_held_out_problems(tmp_path, capsys):
  """generate.holdout: g is the proxy's gradient on the teacher's answers to held-out problems
  (a GSM8K slice read from --config.data.manual_dir), not to the demo's own prompts; another g
  at the same lam samples other text. generate.problems_from samples a dataset's problems."""
  from test_preflight import gsm8k_manual_dir
  config = generate_config.get_config()
  config.generate.workdir = str(tmp_path / "demo")
  config.sample.max_new_tokens = 6
  config.generate.update(dict(lam=20.0, logprob_drop=0.0))
  own = main.run_generate(config)
  config.data.update(dict(manual_dir=gsm8k_manual_dir(str(tmp_path / "manual")),
                          data_dir=str(tmp_path / "tfds")))
  config.generate.update(dict(holdout="gsm8k:train", holdout_n=3))
  held_out = main.run_generate(config)
  out = capsys.readouterr().out
  assert "g: the proxy's gradient on the teacher's greedy answers to the 2 prompts above" in out
  assert "g: the proxy's gradient on the teacher's greedy answers to 3 problems of gsm8k:train" in out
  name = "antidistilled (lam=20, method=jvp)"
  assert held_out["plain"] == own["plain"] and held_out[name] != own[name]
  # generate.problems_from: a dataset's first problems are sampled instead of `problems`.
  config.generate.update(dict(problems_from="gsm8k:test", problems_n=2))
  texts = main.run_generate(config)
  out = capsys.readouterr().out
  assert len(texts["plain"]) == 2 and config.generate.problems[0] not in out
  assert len(re.findall(r"\n### What is \d+ \+ 1\?\n", out)) == 4  # 2 problems x 2 modes
  # A split the dataset lacks, or a spec that is not DATASET:SPLIT, names the option and the fix.
  config.generate.problems_from = "gsm8k:platinum_typo"
  with pytest.raises(errors.MissingInput,
                     match="--config.generate.problems_from=gsm8k:platinum_typo: .*has no split.*"
                           "e.g. --config.generate.problems_from=gsm8k:train"):
    main.run_generate(config)
  config.generate.update(dict(problems_from="gsm8k:test", holdout="gsm8k"))
  with pytest.raises(errors.BadValue, match="--config.generate.holdout='gsm8k': expected "
                                            "DATASET:SPLIT"):
    main.run_generate(config)
