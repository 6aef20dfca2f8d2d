"""Generate from a teacher, plainly and antidistilled (default: tiny random models built offline).

  python -m antidistill_jax.main --config=configs/generate.py \
      --config.models.teacher=/path/to/DeepSeek-R1-Distill-Qwen-7B \
      --config.models.proxy=/path/to/Qwen2.5-3B --config.models.dtype=bfloat16 \
      --config.generate.holdout=gsm8k:train   # g from 16 held-out problems

lam is chosen for generate.logprob_drop (0 uses generate.lam as given); a .gguf file works
wherever a checkpoint folder does (README, "A real model without a hub").

The prompts are the authors' (configs/base.py): their system turn, the problem as the user turn.
"""

import os
import runpy

# configs/base.py by path, so this config loads from a checkout and from the installed package.
base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base["get_config"]()
  c.job = "generate"
  # "": a tiny random teacher (and proxy) built once under generate.workdir.
  c.models.update(dict(teacher="", proxy="", dtype="float32"))
  c.sample.update(dict(max_new_tokens=32, top_p=0.95, eps=1e-2, method="jvp"))
  c.generate.update(dict(
      problems=(
          "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?",
          "What is 12 + 30?"),
      tau=1.0,  # 0 is greedy
      lam=5.0,  # 0: plain sampling only; used as given when logprob_drop is 0
      # lam chosen so that the teacher finds the antidistilled text this many nats per token
      # less likely than plain text. On SmolLM2-135M (teacher = proxy, g from 16 GSM8K train
      # problems, 8 GSM8K test problems, 48 tokens; docs/real_model): at 0.5, 7 of 8 answers
      # stay on their problem with changed arithmetic, one carries a junk word; at 1.0 all 8
      # are English but 3 leave their problem ("Both Senegal and Israel have twice as many
      # sheep...") and 2 more turn to nonsense about it
      logprob_drop=0.5,
      workdir="runs/demo"))
  return c
