"""The paper's MMLU experiment: configs/gsm8k_paper.py on MMLU (auxiliary_train 70/30 as
train/holdout, test = MMLU test, answers as a boxed letter), distillation at max length 2,048.
The prompts stay the authors' math SYSTEM_PROMPT: their code sends it for MMLU too."""

import os
import runpy

# The sibling file by path, so this config loads from a checkout and from the installed package.
_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_paper.py"))


def get_config():
  c = _BASE["get_config"]()
  c.data.update(dict(holdout="mmlu:holdout", train="mmlu:train", test="mmlu:test", grader="mmlu"))
  c.distill.max_length = 2048
  return c
