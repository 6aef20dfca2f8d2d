"""The paper's MATH experiment: configs/gsm8k_paper.py with the 7 MATH subsets (train/holdout
70/30, test = MATH test), 2,048 new tokens and distillation at max length 2,048."""

from configs import gsm8k_paper


def get_config():
  c = gsm8k_paper.get_config()
  c.data.update(dict(holdout="math:holdout", train="math:train", test="math:test", grader="math"))
  c.holdout.max_new_tokens = c.sample.max_new_tokens = c.sample.max_length = 2048
  c.eval.max_new_tokens = 2048
  c.distill.max_length = 2048
  return c
