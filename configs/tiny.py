"""The whole pipeline on tiny random models and a synthetic task: offline, about a minute on CPU.

  python -m antidistill_jax.main --config=configs/tiny.py --workdir=runs/tiny

The models are random (built under workdir/models), so accuracies are noise: this config checks
that every stage runs, resumes and reports. configs/synthetic.py (next) trains models that can
show the effect.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = dict(holdout="synthetic:holdout", train="synthetic:train", test="synthetic:test",
                grader="gsm8k", max_holdout=8, max_train=8, max_test=8, seed=0,
                manual_dir="", data_dir="", split_seed=42)
  c.models = dict(teacher="", proxy="", student="", dtype="float32")
  c.tiny = dict(enabled=True, seed=0, vocab_size=400,
                teacher=dict(hidden_size=64, intermediate_size=128),
                proxy=dict(hidden_size=32, intermediate_size=64),
                student=dict(model_type="llama", hidden_size=32, intermediate_size=64))
  c.prompts = dict(system="", max_prompt_length=256)
  c.holdout = dict(max_new_tokens=16, batch_size=8)
  c.grad = dict(micro_batch_size=8)
  c.sample = dict(max_new_tokens=16, batch_size=8, method="jvp", placement="paper", eps=1e-2,
                  top_p=0.95, top_k=None, seed=0)
  c.grid = dict(ads_taus=(1.0,), ads_lam_over_eps=(300.0,), temperatures=(1.0, 1.5))
  c.distill = dict(lora_rank=4, lora_alpha=8.0, learning_rate=5e-3, epochs=2, batch_size=4,
                   micro_batch_size=4, max_length=128, length_multiple=32, eval_every=2,
                   checkpoint_every=2, warmup_fraction=0.0)
  c.eval = dict(max_new_tokens=8, batch_size=8)
  # data x model devices (-1: the rest); fsdp_teacher also shards the teacher's hidden dimension
  # over `data` (FSDP), for teachers that do not fit on `model` devices.
  c.mesh = dict(data=-1, model=1, fsdp_teacher=False)
  return ml_collections.ConfigDict(c)
