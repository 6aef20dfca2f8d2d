"""The paper's MMLU experiment: configs/gsm8k_paper.py on MMLU (auxiliary_train 70/30 as
train/holdout, test = MMLU test, answers as a boxed letter), distillation at max length 2,048."""

from configs import gsm8k_paper


def get_config():
  c = gsm8k_paper.get_config()
  c.data.update(dict(holdout="mmlu:holdout", train="mmlu:train", test="mmlu:test", grader="mmlu"))
  c.distill.max_length = 2048
  return c
