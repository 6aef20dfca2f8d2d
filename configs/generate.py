"""Generate from a teacher, plainly and antidistilled (default: tiny random models built offline).

  python -m antidistill_jax.main --config=configs/generate.py \
      --config.checkpoint=/path/to/DeepSeek-R1-Distill-Qwen-7B \
      --config.proxy=/path/to/Qwen2.5-3B --config.dtype=bfloat16 --config.lam=0.1
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint = ""  # local HF directory; empty: build a tiny random one under workdir
  c.workdir = "runs/demo"
  c.dtype = "float32"
  c.prompts = (
      "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
      "in May. How many clips did Natalia sell altogether in April and May?",
      "What is 12 + 30?",
  )
  c.system_prompt = "Please reason step by step, and put your final answer within \\boxed{}."
  c.max_new_tokens = 32
  c.tau = 1.0  # 0 is greedy
  c.top_p = 0.95
  c.seed = 0
  c.proxy = ""  # local HF directory sharing the teacher's tokenizer; empty: a tiny random one
  c.lam = 5.0  # 0: plain sampling only
  c.eps = 1e-2  # method="fd" only
  c.method = "jvp"  # exact Delta ("fd": the paper's finite difference)
  return c
