"""The sampling demo, configs/generate.py (the README's main job, configs/synthetic.py, is
tests/test_pipeline.py::test_the_synthetic_config_runs_at_reduced_size)."""

import os

from antidistill_jax import main
from configs import generate as generate_config


def test_main_job_builds_a_tiny_teacher_and_generates(tmp_path, capsys):
  config = generate_config.get_config()
  assert config.job == "generate"
  config.generate.workdir = str(tmp_path)
  config.sample.max_new_tokens = 6
  texts = main.run_generate(config)
  plain, ads = texts["plain"], texts["antidistilled (lam=5.0, method=jvp)"]
  assert len(plain) == len(ads) == len(config.generate.problems)
  assert plain != ads  # same seed: only the perturbation differs
  assert os.path.exists(tmp_path / "tiny_teacher" / "model.safetensors")
  assert os.path.exists(tmp_path / "tiny_proxy" / "model.safetensors")
  assert "===== antidistilled" in capsys.readouterr().out
  # A second run loads the same checkpoints and, with the same seed, says the same.
  assert main.run_generate(config) == texts
