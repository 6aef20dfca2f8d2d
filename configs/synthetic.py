"""The paper's claim on a laptop: a synthetic reasoning task, tiny models trained from scratch.

  python -m antidistill_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

Task (`data.synthetic.chains`): sums of 3-5 single-digit numbers, answered by a chain of steps
"a+b=c" that accumulates from the left, operands of a step in either order, steps joined by ";"
or ",", then "#" and the sum; graded by the integer after the last "#". One token per character
(`task_models.task_tokenizer`).

Models (`scratch`, all trained here with the distillation code, full fine-tuning):
  teacher  Qwen2-style, on gold traces;
  proxy    Qwen2-style and smaller, on the teacher's traces at tau = 1;
  student  Llama-style (another family), pre-trained on easier chains (2-3 terms, one fixed
           writing, train-split problems only): it has a measurable undistilled accuracy.
Then the paper's pipeline: holdout traces and g, a short lambda calibration (the ADS lams are
read off a ladder so that the teacher's accuracy spans the temperature sweep's), both sweeps,
a student per trace set, evaluation, the report.

`--config.seed=S` sets the task's problems, every model's initialisation and the sampling
seed (configs/base.py links them): docs/ reports seeds 0-2.
"""

import os
import runpy

# configs/base.py by path, so this config loads from a checkout and from the installed package.
base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config():
  c = base["get_config"]()
  c.data.update(dict(holdout="synthetic:holdout", train="synthetic:train", test="synthetic:test",
                     grader="synthetic", max_holdout=512, max_train=3000, max_test=512,
                     split_seed=0,
                     task=dict(kind="chains", min_terms=3, max_terms=5, max_value=9,
                               order="free", separators=(";", ","), direction="left")))
  shape = lambda d, layers: dict(hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2)
  # Sizes and steps from bench/synthetic_scale.py (bench/RESULTS.md): the smallest teacher that
  # is ~99% greedy, a smaller proxy, a student that learns the task from ~3k traces once it
  # knows 2-3-term chains (its undistilled accuracy is the dashed line).
  c.scratch.update(dict(
      enabled=True, batch_size=256, eval_rows=256,
      teacher=dict(model_type="qwen2", shape=shape(64, 2), traces=48_000,
                   train=dict(batch_size=32, learning_rate=5e-3, epochs=1)),
      proxy=dict(model_type="qwen2", shape=shape(48, 2), traces=2048,
                 train=dict(batch_size=32, learning_rate=4e-3, epochs=8)),
      student=dict(model_type="llama", shape=shape(64, 3),
                   train=dict(batch_size=32, learning_rate=3e-3, epochs=1),
                   pretrain=dict(traces=16_000,
                                 task=dict(min_terms=2, max_terms=3, order="fixed",
                                           separators=(",",))))))
  # No system turn: the models learn bare "a+b+c" user turns from scratch, and the authors'
  # prompt (~230 characters, one token each) alone would overflow max_prompt_length=64.
  c.prompts.update(dict(system="", max_prompt_length=64, answer_forcing=False))
  c.holdout.update(dict(max_new_tokens=48, batch_size=256))
  c.grad.micro_batch_size = 128
  c.sample.update(dict(max_new_tokens=48, batch_size=256, method="jvp", placement="paper",
                       eps=1e-2, top_p=None, top_k=None))
  # ADS at tau = 1 with calibrated lams; the temperature sweep above tau = 1.
  c.grid.update(dict(ads_taus=(1.0,), ads_lam_over_eps=(), temperatures=(1.0, 1.3, 1.6),
                     calibrate=dict(n=256, points=3,
                                    ladder=(0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0))))
  c.distill.update(dict(lora_rank=None, learning_rate=3e-3, weight_decay=0.0,
                        warmup_fraction=0.05, epochs=7, batch_size=32, micro_batch_size=32,
                        max_length=128, length_multiple=32, eval_every=94, checkpoint_every=329,
                        clip_norm=1.0))
  c.eval.update(dict(max_new_tokens=48, batch_size=256))
  # Attackers distilling from the same ADS traces (antidistill_jax/attacks.py); none by default
  # (each adds a student per point). Settings fixed before any attacker ran:
  #   --config.attacks.names=keep_correct,clean_mix,reaimed
  c.attacks.update(dict(names=(), clean_mix=dict(rows=300),
                        reaimed=dict(clean_rows=256, drop_fraction=0.25, micro_batch_size=128)))
  c.attacks.reweight.micro_batch_size = 128  # tiny models: many traces per scoring pass
  return c
