"""Any model on the test split, greedily unless told otherwise: the accuracy the
eval_student, eval_teacher and eval_base stages record."""

from __future__ import annotations

from antidistill_jax import evaluation


def evaluate_with(x, out, sampler, params=None) -> dict:
  """`sampler` on x's test split into out/eval.jsonl; its raw and answer-forced accuracy."""
  summary = evaluation.evaluate(sampler, x.split("test"), out, params=params or x.eval_params(),
                                batch_size=x.config.eval.batch_size, name="eval",
                                **x.trace_settings())
  return dict(accuracy=summary["accuracy"], forced_accuracy=summary["forced_accuracy"],
              n=summary["n"])


