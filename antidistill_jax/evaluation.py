"""Evaluating a model end to end: sample its traces on a split, grade them, write a summary.

  summary = evaluate(sampler, examples, "runs/x/eval", dataset="gsm8k",
                     params=sampling.SamplingParams(max_new_tokens=1024, tau=0.0),
                     batch_size=64, name="student")

The grading rules themselves (`is_correct`, answer extraction, answer forcing, `accuracy`) are
in `grading`, at the bottom of the module graph; this module sits above `traces`.
"""

from __future__ import annotations

from absl import logging
from etils import epath

from antidistill_jax import files, parallel, traces


def evaluate(sampler, examples, out_dir, *, dataset: str, params, batch_size: int,
             name: str = "eval", **trace_kwargs) -> dict:
  """Generates and grades the traces of `sampler`'s model on `examples`: out_dir/<name>.jsonl
  (+ .meta.json) through `traces.generate_traces`, and a summary out_dir/<name>.json, which is
  returned. out_dir: local or gs:// (`etils.epath`); only process 0 writes.

  params: `sampling.SamplingParams`. Students are evaluated greedily (tau=0); the teacher with
  the settings of its training traces (a Sampler with its proxy, and the same params). A rerun
  with the same settings reads the finished traces back instead of generating again.
  trace_kwargs go to generate_traces (system, max_prompt_length, answer_forcing, ...).
  """
  out_dir = epath.Path(out_dir)
  trace_path = out_dir / f"{name}.jsonl"
  meta = traces.generate_traces(sampler, examples, trace_path, dataset=dataset, params=params,
                                batch_size=batch_size, **trace_kwargs)
  stats, counts = meta["statistics"], meta["counts"]
  summary = dict(name=name, dataset=dataset, traces=str(trace_path),
                 accuracy=stats["accuracy"], forced_accuracy=stats["forced_accuracy"],
                 n=counts["rows"], dropped=counts["dropped"],
                 fraction_finished=stats["fraction_finished"], length_mean=stats["length_mean"],
                 settings=meta["config"])
  if parallel.is_writer():
    files.write_json(out_dir / f"{name}.json", summary)
  logging.info("%s on %s: accuracy %s, answer-forced %s (n=%d, %d dropped)", name, dataset,
               summary["accuracy"], summary["forced_accuracy"], summary["n"], summary["dropped"])
  return summary
