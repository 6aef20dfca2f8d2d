"""The paper's MATH experiment: configs/gsm8k_paper.py with the 7 MATH subsets (train/holdout
70/30, test = MATH test), 2,048 new tokens and distillation at max length 2,048."""

import os
import runpy

# The sibling file by path, so this config loads from a checkout and from the installed package.
_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_paper.py"))


def get_config():
  c = _BASE["get_config"]()
  c.data.update(dict(holdout="math:holdout", train="math:train", test="math:test", grader="math"))
  c.holdout.max_new_tokens = c.sample.max_new_tokens = c.sample.max_length = 2048
  c.eval.max_new_tokens = 2048
  c.distill.max_length = 2048
  return c
