"""evaluation.evaluate: traces + summary JSON; the teacher evaluated with lam != 0 goes through
its proxy."""

import dataclasses
import json
import os

import numpy as np
import pytest

from antidistill_jax import evaluation, sampling, traces
from test_traces import fake_forcing, make_examples, tiny_pair  # noqa: F401 (module fixture)

KW = dict(batch_size=2, system=None)
SAMPLED = sampling.SamplingParams(max_new_tokens=12, tau=1.0, top_p=0.9, seed=11)
GREEDY = sampling.SamplingParams(max_new_tokens=12, tau=0.0)


def test_evaluate_writes_the_summary(tiny_pair, tokenizer, tmp_path):
  teacher, proxy, grad = tiny_pair
  examples = make_examples(4)
  common = dict(dataset="gsm8k", **KW)
  plain = evaluation.evaluate(sampling.Sampler(teacher, tokenizer), examples, tmp_path,
                              name="teacher", params=SAMPLED, **common)
  ads = evaluation.evaluate(sampling.Sampler(teacher, tokenizer, proxy=proxy, grad=grad),
                            examples, tmp_path, name="teacher_ads",
                            params=dataclasses.replace(SAMPLED, lam=3.0), **common)
  for name, summary in (("teacher", plain), ("teacher_ads", ads)):
    with open(os.path.join(tmp_path, f"{name}.json")) as f:
      assert json.load(f) == summary
    meta = traces.read_meta(os.path.join(tmp_path, f"{name}.jsonl"))
    assert summary["settings"] == meta["config"]
    assert summary["accuracy"] == meta["statistics"]["accuracy"]
    assert summary["forced_accuracy"] == meta["statistics"]["forced_accuracy"]
    # each figure is the rows' own, recomputed from the written traces
    rows = traces.read_traces(os.path.join(tmp_path, f"{name}.jsonl"))
    assert len(rows) == 4
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert summary["forced_accuracy"] == pytest.approx(np.mean([r["forced_correct"] for r in rows]))
    assert summary["fraction_finished"] == pytest.approx(np.mean([r["finished"] for r in rows]))
    assert summary["length_mean"] == pytest.approx(np.mean([r["num_tokens"] for r in rows]))
    assert (summary["n"], summary["dropped"]) == (4, 0)
    assert summary["traces"] == os.path.join(tmp_path, f"{name}.jsonl")
  assert ads["settings"]["lam"] == 3.0 and ads["settings"]["proxy_fingerprint"] is not None
  # Same seed, same rows: only the proxy's perturbation can make the completions differ.
  plain_rows = traces.read_traces(os.path.join(tmp_path, "teacher.jsonl"))
  ads_rows = traces.read_traces(os.path.join(tmp_path, "teacher_ads.jsonl"))
  assert [r["prompt_ids"] for r in plain_rows] == [r["prompt_ids"] for r in ads_rows]
  assert [r["completion_ids"] for r in plain_rows] != [r["completion_ids"] for r in ads_rows]
  # A student, greedily.
  student = evaluation.evaluate(sampling.Sampler(teacher, tokenizer), examples, tmp_path,
                                name="student", dataset="gsm8k", params=GREEDY, **KW)
  assert student["settings"]["tau"] == 0.0
  student_rows = traces.read_traces(os.path.join(tmp_path, "student.jsonl"))
  assert [r["completion_ids"] for r in student_rows] != [r["completion_ids"] for r in plain_rows]


def test_evaluate_reports_the_answer_forced_accuracy(tiny_pair, tokenizer, tmp_path,
                                                    monkeypatch):
  teacher, _, _ = tiny_pair
  fake_forcing(monkeypatch, tokenizer, ["0}", "4}", "6}", "9}"])  # golds 0, 3, 6, 9
  summary = evaluation.evaluate(sampling.Sampler(teacher, tokenizer), make_examples(4), tmp_path,
                                name="student", dataset="gsm8k", params=SAMPLED, **KW)
  assert summary["forced_accuracy"] == 0.75
  assert summary["accuracy"] <= summary["forced_accuracy"]


def test_summary_takes_each_figure_from_its_own_statistic(tmp_path, monkeypatch):
  # Traces whose statistics all differ (the tiny models' rows all reach the cap, so there the
  # mean length equals every quantile): each summary field is the same-named one.
  stats = dict(accuracy=0.25, forced_accuracy=0.5, fraction_finished=0.75, length_mean=6.5,
               length_p10=2.0, length_p50=5.0, length_p90=11.0)
  meta = dict(statistics=stats, counts=dict(rows=7, dropped=2), config=dict(tau=1.0))
  monkeypatch.setattr(traces, "generate_traces", lambda *a, **k: meta)
  summary = evaluation.evaluate(None, [], tmp_path, name="s", dataset="gsm8k", params=None,
                                batch_size=2)
  assert summary == dict(name="s", dataset="gsm8k", traces=os.path.join(tmp_path, "s.jsonl"),
                         accuracy=0.25, forced_accuracy=0.5, n=7, dropped=2,
                         fraction_finished=0.75, length_mean=6.5, settings=dict(tau=1.0))
