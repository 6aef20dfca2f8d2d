"""The whole pipeline on tiny random models and a synthetic task: offline, about a minute on CPU.

  python -m antidistill_jax.main --config=configs/tiny.py --workdir=runs/tiny

The models are random (built under workdir/models), so accuracies are noise: this config checks
that every stage runs, resumes and reports. configs/synthetic.py (next) trains models that can
show the effect.
"""

import os
import runpy

# configs/base.py by path, so this config loads from a checkout and from the installed package.
base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base["get_config"]()
  c.data.update(dict(holdout="synthetic:holdout", train="synthetic:train", test="synthetic:test",
                     grader="gsm8k", max_holdout=8, max_train=8, max_test=8))
  c.tiny.update(dict(enabled=True, vocab_size=400,
                     teacher=dict(hidden_size=64, intermediate_size=128),
                     proxy=dict(hidden_size=32, intermediate_size=64),
                     student=dict(model_type="llama", hidden_size=32, intermediate_size=64)))
  # No system turn: the task is GSM8K-formatted sums and the models are random, so the authors'
  # prompt would only lengthen every prompt (the 400-token BPE is trained on the splits' text).
  c.prompts.system = ""
  c.holdout.update(dict(max_new_tokens=16, batch_size=8))
  c.sample.update(dict(max_new_tokens=16, batch_size=8, top_p=0.95))
  c.grid.update(dict(ads_taus=(1.0,), ads_lam_over_eps=(300.0,), temperatures=(1.0, 1.5)))
  c.distill.update(dict(lora_rank=4, lora_alpha=8.0, learning_rate=5e-3, epochs=2, batch_size=4,
                        micro_batch_size=4, max_length=128, length_multiple=32, eval_every=2,
                        checkpoint_every=2, warmup_fraction=0.0))
  c.eval.update(dict(max_new_tokens=8, batch_size=8))
  return c
