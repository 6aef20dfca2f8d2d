"""The README's main job on its embedded default config."""

import os

from antidistill_jax import main
from configs import generate as generate_config


def test_main_job_builds_a_tiny_teacher_and_generates(tmp_path, capsys):
  config = generate_config.get_config()
  config.workdir = str(tmp_path)
  config.max_new_tokens = 6
  texts = main.run_generate(config)
  assert len(texts) == len(config.prompts) and all(isinstance(t, str) for t in texts)
  assert os.path.exists(tmp_path / "tiny_teacher" / "model.safetensors")
  assert "tokens in" in capsys.readouterr().out
  # A second run loads the same checkpoint and, greedy, says the same.
  assert main.run_generate(config) == texts
