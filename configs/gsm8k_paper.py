"""The paper's GSM8K experiment (Savani et al. 2025, Figure 3): the authors' models, prompts,
grid and distillation settings.

  python -m antidistill_jax.main --config=configs/gsm8k_paper.py --workdir=runs/gsm8k
  launch/tpu.sh run --config=configs/gsm8k_paper.py --workdir=... --shard=0/4   # see README

Models are hub ids (fetched with huggingface_hub when online) or local directories
(--config.models.teacher=DIR). Train = GSM8K train's seeded 70% (5,231), holdout = its 30%
(2,242), test = GSM8K-Platinum (1,209). Prompts are the authors': a system turn with their
SYSTEM_PROMPT and the user turn problem.strip() + "\\n", through each model's chat template
(PAPER.md, "Prompt layout"). Sampling follows the authors' code: Delta added to the raw teacher
logits (placement "reference", so lam = tau * lam_paper), top-k 50 then top-p 0.95, max_length
1024 counting the left-padded prompt, lam = b * eps for b in linspace(0, 15, 20) at tau 0.9 and
1.0, and the temperature sweep linspace(1, 2, 20). Delta is the exact JVP (the authors' eps =
1e-2 central difference is method="fd"; in bf16 it is noisy: bench/RESULTS.md). The
undistilled student is evaluated zero-shot with its chat template (the paper's 31% is 8-shot
chain of thought).
"""

import os
import runpy

import numpy as np

# configs/base.py by path, so this config loads from a checkout and from the installed package.
base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base["get_config"]()
  c.data.update(dict(holdout="gsm8k:holdout", train="gsm8k:train", test="gsm8k:platinum",
                     grader="gsm8k", max_holdout=0, max_train=0, max_test=0, manual_dir="",
                     data_dir="", split_seed=42))
  c.models.update(dict(teacher="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", proxy="Qwen/Qwen2.5-3B",
                       student="meta-llama/Llama-3.2-3B", dtype="bfloat16"))
  c.prompts.update(dict(system=base["SYSTEM_PROMPT"], max_prompt_length=256))
  c.holdout.update(dict(max_new_tokens=1024, batch_size=64))
  c.grad.micro_batch_size = 8
  c.sample.update(dict(max_new_tokens=1024, max_length=1024, batch_size=64, method="jvp",
                       placement="reference", eps=1e-2, top_p=0.95, top_k=50))
  c.grid.update(dict(ads_taus=(0.9, 1.0),
                     ads_lam_over_eps=tuple(float(b) for b in np.linspace(0, 15, 20)),
                     temperatures=tuple(float(t) for t in np.linspace(1, 2, 20))))
  c.distill.update(dict(lora_rank=128, lora_alpha=128.0, lora_dropout=0.0, learning_rate=5e-4,
                        weight_decay=0.1, clip_norm=1.0, warmup_fraction=0.03, epochs=3,
                        batch_size=16, micro_batch_size=4, max_length=4096, length_multiple=256,
                        eval_every=50, checkpoint_every=50))
  c.eval.update(dict(max_new_tokens=1024, batch_size=64))
  # model=1 suits 80 GB GPUs (a 7B + 3B pair in bf16 with g: ~33 GB of weights per device); on
  # 16 GiB TPU chips (v5e) use --config.mesh.model=4 (notebooks/gsm8k_tpu.ipynb).
  c.mesh.update(dict(data=-1, model=1, fsdp_teacher=False))
  return c
