"""The experiment's data flow on tiny models, through the public APIs only:
data -> prompts -> holdout traces -> proxy gradient -> ADS traces -> distill -> evaluate."""

import dataclasses
import os

import jax.numpy as jnp
import pytest

from antidistill_jax import (data, distill, evaluation, gradients, grading, models,
                             random_checkpoints, sampling, traces)
from antidistill_jax import tokenizer as tok_lib

GSM8K_DIR = os.environ.get("ANTIDISTILL_GSM8K_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(GSM8K_DIR, "train.jsonl")),
                    reason=f"GSM8K not in {GSM8K_DIR} (set ANTIDISTILL_GSM8K_DIR)")
def test_tiny_experiment_end_to_end(tmp_path):
  holdout = data.load_split("gsm8k", "holdout", manual_dir=GSM8K_DIR, data_dir=tmp_path / "tfds")[:4]
  train = data.load_split("gsm8k", "train", manual_dir=GSM8K_DIR, data_dir=tmp_path / "tfds")[:4]
  tok = random_checkpoints.train_tokenizer([e.problem + e.solution for e in holdout + train],
                                          vocab_size=400)
  small = dict(hidden_size=32, intermediate_size=64)
  paths = {name: random_checkpoints.make_tiny_checkpoint(tmp_path / name, tokenizer=tok,
                                                         seed=seed, **cfg)
           for name, seed, cfg in (("teacher", 0, {}), ("proxy", 1, small),
                                   ("student", 2, dict(small, model_type="llama")))}
  teacher = models.from_pretrained(paths["teacher"])
  proxy = models.from_pretrained(paths["proxy"])
  tokenizer = tok_lib.load_tokenizer(paths["teacher"])
  common = dict(dataset="gsm8k", batch_size=4, max_prompt_length=512)
  sample = sampling.SamplingParams(max_new_tokens=12, tau=0.0)
  plain = sampling.Sampler(teacher, tokenizer)

  # Holdout traces (greedy, as the reference) -> the proxy's gradient on them.
  traces.generate_traces(plain, holdout, tmp_path / "holdout.jsonl", params=sample, **common)
  pairs = [(r["prompt_ids"], r["completion_ids"]) for r in traces.read_traces(tmp_path / "holdout.jsonl")]
  grad, meta = gradients.proxy_gradient(proxy, pairs, micro_batch_size=4)
  gradients.save_gradient(tmp_path / "grad", grad, meta)
  grad, _ = gradients.load_gradient(tmp_path / "grad", proxy)

  # Antidistilled training traces, and the same with lam = 0.
  ads_sampler = sampling.Sampler(teacher, tokenizer, proxy=proxy, grad=grad)
  ads = dataclasses.replace(sample, tau=1.0, top_p=0.95, seed=3, lam=5.0)
  traces.generate_traces(ads_sampler, train, tmp_path / "ads.jsonl", params=ads, **common)
  traces.generate_traces(ads_sampler, train, tmp_path / "plain.jsonl",
                         params=dataclasses.replace(ads, lam=0.0), **common)
  ads_rows = traces.read_traces(tmp_path / "ads.jsonl")
  plain_rows = traces.read_traces(tmp_path / "plain.jsonl")
  assert [r["completion_ids"] for r in ads_rows] != [r["completion_ids"] for r in plain_rows]

  # The student re-tokenizes the traces with its own template and is distilled on them.
  student_tok = tok_lib.load_tokenizer(paths["student"])
  sft = distill.sft_examples(student_tok, ads_rows, system=None, max_length=256)
  config = distill.DistillConfig(lora_rank=4, lora_alpha=8.0, epochs=2, batch_size=2,
                                 micro_batch_size=2, length_multiple=32, max_length=256,
                                 eval_every=2, checkpoint_every=2)
  student, history = distill.distill(models.from_pretrained(paths["student"]), sft, sft[:2],
                                     str(tmp_path / "distill"), config)
  assert len(history) == 4 and "holdout_loss" in history[-1]
  models.save_pretrained(student, tmp_path / "student_out")
  student_tok.save_pretrained(tmp_path / "student_out")

  # Evaluate the exported student (greedy) and the teacher with its ADS settings.
  exported = models.from_pretrained(tmp_path / "student_out")
  ids = jnp.asarray([sft[0][0]])
  assert jnp.allclose(exported(ids), student(ids), atol=1e-5)
  greedy = dict(dataset="gsm8k", batch_size=4,
                params=sampling.SamplingParams(max_new_tokens=8, tau=0.0))
  s = evaluation.evaluate(sampling.Sampler(exported, student_tok), train, tmp_path / "eval",
                          name="student", **greedy)
  t = evaluation.evaluate(ads_sampler, train, tmp_path / "eval", name="teacher_ads", params=ads,
                          **common)
  for summary in (s, t):
    assert summary["n"] == 4 and 0.0 <= summary["accuracy"] <= summary["forced_accuracy"] <= 1.0
  # The checkpoint on disk is the student that was trained: evaluating the in-memory merged
  # student gives the same completions and accuracies (export keeps weights, rope, EOS ids).
  m = evaluation.evaluate(sampling.Sampler(student, student_tok), train, tmp_path / "eval",
                          name="student_in_memory", **greedy)
  disk_rows, memory_rows = traces.read_traces(s["traces"]), traces.read_traces(m["traces"])
  assert [r["completion_ids"] for r in disk_rows] == [r["completion_ids"] for r in memory_rows]
  assert [r["forced"] for r in disk_rows] == [r["forced"] for r in memory_rows]
  assert (s["accuracy"], s["forced_accuracy"]) == (m["accuracy"], m["forced_accuracy"])
  # The reported accuracy is the written rows' accuracy under the public grader.
  assert s["accuracy"] == grading.accuracy(
      "gsm8k", [r["solution"] for r in disk_rows], [r["completion"] for r in disk_rows])
