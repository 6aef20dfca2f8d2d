"""Trace store: rows equal the sampler's output, statistics re-derive from the rows, a killed
run resumes to a byte-identical file, changed settings are refused, answer forcing continues
the right prefix greedily and is graded."""

import dataclasses
import json
import os

import numpy as np
import pytest

from antidistill_jax import errors, gradients, grading, models, random_checkpoints, sampling, traces
from antidistill_jax.data import Example
from antidistill_jax.data.prompts import build_prompts
from antidistill_jax.tokenizer import eos_ids as tokenizer_eos_ids

# Several end-of-sequence ids (as Llama 3 has) so a random tiny teacher stops now and then and
# lengths vary; 2 is the tokenizer's <|im_end|>.
EOS_IDS = [2, 40, 150, 250]
# One sampling program (tau, top_p, lengths) shared by most tests: each new one compiles.
KW = dict(max_new_tokens=12, batch_size=2, system=None, tau=1.0, top_p=0.9)
PARAM_KEYS = {f.name for f in dataclasses.fields(sampling.SamplingParams)}


def run_traces(teacher, tokenizer, examples, path, *, proxy=None, grad=None, **kw):
  """generate_traces with the SamplingParams fields given as keywords among the others."""
  params = sampling.SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in PARAM_KEYS})
  sampler = sampling.Sampler(teacher, tokenizer, proxy=proxy, grad=grad)
  return traces.generate_traces(sampler, examples, path, params=params, **kw)


def add_eos_ids(path, ids):
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["eos_token_id"] = ids
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer):
  """(teacher, proxy, grad): a 384-row teacher (64 rows past the tokenizer), a smaller proxy."""
  root = tmp_path_factory.mktemp("traces_models")
  t_dir = random_checkpoints.make_tiny_checkpoint(root / "teacher", tokenizer=tokenizer, seed=0,
                                                  vocab_size=384)
  p_dir = random_checkpoints.make_tiny_checkpoint(root / "proxy", tokenizer=tokenizer, seed=1,
                                                  vocab_size=352, hidden_size=32,
                                                  intermediate_size=64)
  add_eos_ids(t_dir, EOS_IDS)
  teacher, proxy = models.from_pretrained(t_dir), models.from_pretrained(p_dir)
  rng = np.random.default_rng(0)
  holdout = [(rng.integers(3, 300, 6).tolist(), rng.integers(3, 300, 8).tolist())
             for _ in range(4)]
  grad, _ = gradients.proxy_gradient(proxy, holdout, micro_batch_size=4)
  return teacher, proxy, grad


def make_examples(n):
  """Problems "What is i + 2i?" with GSM8K-style gold solutions (#### 3i)."""
  return [Example(problem=f"What is {i} + {2 * i}?",
                  solution=f"{i} + {2 * i} = {3 * i}\n#### {3 * i}", answer=str(3 * i),
                  source_index=100 + i) for i in range(n)]


# Statistics that depend on the machine and on interruptions, not on the rows.
TIMING_KEYS = ("seconds", "tokens_per_second")


def without_timing(meta):
  meta = json.loads(json.dumps(meta))
  for k in TIMING_KEYS:
    meta["statistics"].pop(k)
  return meta


@pytest.fixture(scope="module")
def reference(tiny_pair, tokenizer, tmp_path_factory):
  """An uninterrupted run: 5 prompts in batches of 2 (the last one short)."""
  teacher, _, _ = tiny_pair
  path = str(tmp_path_factory.mktemp("ref") / "train.jsonl")
  meta = five_traces(teacher, tokenizer, path)
  with open(path, "rb") as f:
    return f.read(), meta


REAL_CALL = sampling.Sampler.__call__


class Killed(Exception):
  pass


def counting_generate(monkeypatch, fail_at=None):
  """Wraps Sampler.__call__: records each call's prompts, settings (the params' fields and
  first_row) and output, and raises on call number `fail_at` (1-based), as a killed process
  would stop there."""
  calls = []

  def wrapper(sampler, prompts, params, first_row=0):
    if fail_at is not None and len(calls) + 1 == fail_at:
      raise Killed(f"killed at generate call {fail_at}")
    out = REAL_CALL(sampler, prompts, params, first_row=first_row)
    calls.append((prompts, dict(params.as_dict(), first_row=first_row), out))
    return out

  monkeypatch.setattr(sampling.Sampler, "__call__", wrapper)
  return calls


def five_traces(teacher, tokenizer, path):
  """The run both kill tests interrupt: 5 examples, batches of 2, seed 7."""
  return run_traces(teacher, tokenizer, make_examples(5), path, dataset="gsm8k",
                                seed=7, **KW)


def killed_run(teacher, tokenizer, tmp_path, monkeypatch, fail_at):
  """Starts five_traces and kills it at generate call `fail_at`; returns (path, rerun)."""
  path = str(tmp_path / "train.jsonl")
  run = lambda: five_traces(teacher, tokenizer, path)
  counting_generate(monkeypatch, fail_at=fail_at)
  with pytest.raises(Killed):
    run()
  return path, run


def test_killed_run_resumes_to_a_byte_identical_file(tiny_pair, tokenizer, reference,
                                                     tmp_path, monkeypatch):
  ref_bytes, ref_meta = reference
  # Each batch makes two generate calls (traces, then answer forcing): die in the second batch.
  path, run = killed_run(tiny_pair[0], tokenizer, tmp_path, monkeypatch, fail_at=3)
  assert not os.path.exists(path) and not os.path.exists(traces.meta_path(path))
  partial = traces.partial_dir(path)
  ref_lines = ref_bytes.splitlines(keepends=True)
  assert sorted(p.name for p in partial.iterdir()) == ["000000000.jsonl", "state.json"]
  assert (partial / "000000000.jsonl").read_bytes() == b"".join(ref_lines[:2])
  # A kill while writing batch 1 leaves at most its tmp file, never a torn batch file.
  (partial / "000000002.jsonl.tmp123").write_bytes(ref_lines[2] + ref_lines[3][:25])

  calls = counting_generate(monkeypatch)
  meta = run()
  # Resumed at row 2 (batch 1 again), not from scratch: batches 1 and 2, two calls each.
  assert len(calls) == 4 and calls[0][1]["first_row"] == 2
  with open(path, "rb") as f:
    assert f.read() == ref_bytes
  assert without_timing(meta) == without_timing(ref_meta)
  assert without_timing(traces.read_meta(path)) == without_timing(ref_meta)
  assert not partial.exists()

  # Every batch, the short last one too, runs with batch_size rows: one compiled shape.
  assert all(len(prompts) == 2 for prompts, _, _ in calls)

  # Finished: a rerun returns the sidecar without generating.
  calls.clear()
  assert run() == meta and not calls


def test_a_batch_written_but_not_counted_is_generated_again(tiny_pair, tokenizer, reference,
                                                            tmp_path, monkeypatch):
  """Killed between a batch file and the state that counts it: the batch runs again."""
  ref_bytes, _ = reference
  path, run = killed_run(tiny_pair[0], tokenizer, tmp_path, monkeypatch, fail_at=3)
  partial = traces.partial_dir(path)
  (partial / "000000002.jsonl").write_bytes(b"not what this run would write\n")
  calls = counting_generate(monkeypatch)
  run()
  assert len(calls) == 4 and calls[0][1]["first_row"] == 2
  with open(path, "rb") as f:
    assert f.read() == ref_bytes


def test_changed_settings_are_refused(tiny_pair, tokenizer, tmp_path, monkeypatch):
  teacher, proxy, grad = tiny_pair
  path = str(tmp_path / "train.jsonl")
  run = lambda **kw: run_traces(teacher, tokenizer, make_examples(3), path,
                                            dataset="gsm8k", **dict(KW, **kw))
  counting_generate(monkeypatch, fail_at=3)
  with pytest.raises(Killed):
    run(seed=1)
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"seed: stored 1, now 2; tau: stored 1\.0, now 0\.5.*"
                                       r"Rerun with the stored settings to resume.*delete"):
    run(tau=0.5, seed=2)
  with pytest.raises(ValueError, match=r"lam: stored 0\.0, now 1\.0.*proxy_fingerprint"):
    run(seed=1, proxy=proxy, grad=grad, lam=1.0)
  with pytest.raises(ValueError, match=r"examples_sha256"):
    run_traces(teacher, tokenizer, make_examples(4)[1:], path, dataset="gsm8k",
                           seed=1, **KW)
  run(seed=1)  # the stored settings resume
  with pytest.raises(ValueError, match=r"max_new_tokens: stored 12, now 8.*Delete .*train\.jsonl"):
    run(seed=1, max_new_tokens=8)


def test_a_split_whose_every_prompt_is_too_long_names_the_limit(tiny_pair, tokenizer, tmp_path):
  teacher, _, _ = tiny_pair
  examples = [Example("word " * 200, "#### 1", "1", i) for i in range(3)]
  path = tmp_path / "t.jsonl"
  with pytest.raises(errors.BadValue, match=r"all 3 prompts of .*t\.jsonl are longer than 64 "
                     r"tokens: nothing to sample\. .*--config\.prompts\.max_prompt_length"):
    run_traces(teacher, tokenizer, examples, str(path), dataset="gsm8k", seed=3,
               max_prompt_length=64, **KW)
  assert not os.listdir(tmp_path)


def test_rows_match_the_sampler_and_statistics_match_the_rows(tiny_pair, tokenizer, tmp_path):
  teacher, _, _ = tiny_pair
  examples = make_examples(5)
  examples.insert(2, Example("word " * 200, "#### 1", "1", 7))  # dropped: prompt too long
  path = str(tmp_path / "t.jsonl")
  meta = run_traces(teacher, tokenizer, examples, path, dataset="gsm8k",
                                seed=3, max_prompt_length=64, **KW)
  rows = traces.read_traces(path)
  assert meta == traces.read_meta(path)
  assert [r["index"] for r in rows] == [0, 1, 3, 4, 5]
  assert [r["source_index"] for r in rows] == [100, 101, 102, 103, 104]
  keys = {"index", "source_index", "problem", "solution", "prompt_ids", "completion_ids",
          "completion", "finished", "teacher_logprob", "num_tokens", "correct", "forced",
          "forced_correct"}
  assert all(set(r) == keys for r in rows)

  prompts = build_prompts(tokenizer, examples, 64, system=None)
  eos = tokenizer_eos_ids(tokenizer, teacher.config)
  assert set(EOS_IDS) <= set(eos)
  # One call over all prompts, batches of 2: the same rows (randomness is per global row).
  gen = sampling.generate(teacher, prompts.ids, sampling.SamplingParams(
      max_new_tokens=12, tau=1.0, top_p=0.9, seed=3), tokenizer, batch_size=2)
  for r, p, ids, logp, fin, ex in zip(rows, prompts.ids, gen.tokens, gen.logprobs, gen.finished,
                                      [examples[i] for i in prompts.indices]):
    assert r["prompt_ids"] == p and r["completion_ids"] == ids
    assert (r["problem"], r["solution"]) == (ex.problem, ex.solution)
    assert r["finished"] == bool(fin) == (ids[-1] in eos)
    assert r["num_tokens"] == len(ids)
    assert r["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert r["teacher_logprob"] == pytest.approx(float(np.sum(logp)), rel=1e-5)
    assert r["correct"] == grading.is_correct("gsm8k", ex.solution, r["completion"])
  assert max(max(r["completion_ids"]) for r in rows) < len(tokenizer)  # no padding rows
  lengths = [r["num_tokens"] for r in rows]
  assert len(set(lengths)) > 1 and 0 < sum(r["finished"] for r in rows) < len(rows)

  s, c, cfg = meta["statistics"], meta["counts"], meta["config"]
  assert c == dict(examples=6, prompts=5, dropped=1, rows=5)
  assert s["accuracy"] == np.mean([grading.is_correct("gsm8k", r["solution"], r["completion"])
                                   for r in rows])
  assert s["forced_accuracy"] == np.mean([r["forced_correct"] for r in rows])
  assert s["fraction_finished"] == np.mean([r["finished"] for r in rows])
  assert s["length_mean"] == pytest.approx(np.mean(lengths))
  for q in (10, 50, 90):
    assert s[f"length_p{q}"] == pytest.approx(np.quantile(lengths, q / 100))
  assert s["length_max"] == max(lengths) and s["generated_tokens"] == sum(lengths)
  # Quantiles on lengths 1..10 (numpy's linear interpolation).
  fake = [dict(num_tokens=n, correct=n > 7, forced_correct=n > 2, finished=n < 4)
          for n in range(10, 0, -1)]
  fs = traces._statistics(fake, True, seconds=2.0)
  assert (fs["length_p10"], fs["length_p50"], fs["length_p90"], fs["length_max"]) == \
      pytest.approx((1.9, 5.5, 9.1, 10))
  assert (fs["accuracy"], fs["forced_accuracy"], fs["fraction_finished"]) == (0.3, 0.8, 0.3)
  assert fs["tokens_per_second"] == 27.5
  assert s["tokens_per_second"] > 0
  assert (cfg["tau"], cfg["top_k"], cfg["top_p"], cfg["seed"], cfg["batch_size"]) == \
      (1.0, None, 0.9, 3, 2)
  assert cfg["teacher_fingerprint"] == gradients.fingerprint(teacher)
  assert cfg["proxy_fingerprint"] is None and cfg["dataset"] == "gsm8k"


def test_answer_forcing_continues_the_trace_greedily(tiny_pair, tokenizer, tmp_path,
                                                     monkeypatch):
  teacher, _, _ = tiny_pair
  calls = counting_generate(monkeypatch)
  path = str(tmp_path / "f.jsonl")
  run_traces(teacher, tokenizer, make_examples(4), path, dataset="gsm8k",
                         seed=3, **KW)
  monkeypatch.undo()
  rows = traces.read_traces(path)
  eos = tokenizer_eos_ids(tokenizer, teacher.config)
  assert 0 < sum(r["finished"] for r in rows) < 4  # both kinds: the EOS is left out
  forced_calls = [(p, kw, out) for p, kw, out in calls if kw["max_new_tokens"] == 32]
  assert len(forced_calls) == 2 and all(kw["tau"] == 0.0 and kw["lam"] == 0.0
                                        for _, kw, _ in forced_calls)
  forced_prompts = [p for prompts, _, _ in forced_calls for p in prompts[:2]]
  forced_tokens = [t for _, _, out in forced_calls for t in out.tokens[:2]]
  think_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
  for r, fp in zip(rows, forced_prompts):
    ids = r["completion_ids"][:-1] if r["finished"] else r["completion_ids"]
    if r["finished"]:
      assert r["completion_ids"][-1] in eos
    assert not think_ids & set(ids)  # no tag in the trace: R1-style, the block is still open
    assert fp == r["prompt_ids"] + ids + tokenizer.encode(CLOSE_AND_FORCE, add_special_tokens=False)
  # The forced tokens are the teacher's greedy continuation, unperturbed.
  greedy = sampling.generate(teacher, forced_prompts,
                             sampling.SamplingParams(max_new_tokens=32, tau=0.0), tokenizer)
  assert greedy.tokens == forced_tokens
  assert [r["forced"] for r in rows] == [tokenizer.decode(t, skip_special_tokens=True)
                                         for t in greedy.tokens]


# The answer-forcing suffix written out by hand: close the think block, then force the box.
FORCE = "\n\n**Final Answer**\n\\[\\boxed{"
CLOSE_AND_FORCE = "\n</think>" + FORCE


@pytest.mark.parametrize("trace, eos_tail, suffix", [
    ("<think>so 5 + 13 = 18", [2], CLOSE_AND_FORCE),  # open block, trailing EOS dropped
    ("so 5 + 13 = 18", [], CLOSE_AND_FORCE),  # no tag: the template opened the block
    ("<think>a</think>The answer is 18.", [2], FORCE),  # closed (</think> a special token)
    ("<think>a</think>b<think>c", [40], CLOSE_AND_FORCE),  # reopened; another EOS id
])
def test_forcing_prompt_hand_written_cases(tokenizer, trace, eos_tail, suffix):
  prompt = [1, 10, 20, 2]
  ids = tokenizer.encode(trace, add_special_tokens=False)
  got = traces.forcing_prompt(tokenizer, prompt, ids + eos_tail, eos_ids=EOS_IDS)
  # The prompt and the trace's own ids are kept as they are (not re-tokenized), its EOS not.
  assert got == prompt + ids + tokenizer.encode(suffix, add_special_tokens=False)
  assert tokenizer.decode(got[len(prompt):], skip_special_tokens=False) == trace + suffix


def test_forcing_prompt_keeps_an_eos_id_inside_the_trace(tokenizer):
  ids = tokenizer.encode("<think>a", add_special_tokens=False)
  got = traces.forcing_prompt(tokenizer, [1], ids + [40, 50], eos_ids=EOS_IDS)
  assert got == [1] + ids + [40, 50] + tokenizer.encode(CLOSE_AND_FORCE, add_special_tokens=False)


def fake_forcing(monkeypatch, tokenizer, texts):
  """Makes the answer-forcing generate calls (32 greedy tokens) return the ids of `texts`, in
  row order: a random tiny teacher only repeats itself, so this is how a forced box with a
  chosen answer reaches the grader."""
  queue = list(texts)

  def wrapper(sampler, prompts, params, first_row=0):
    out = REAL_CALL(sampler, prompts, params, first_row=first_row)
    if params.max_new_tokens == traces.FORCED_TOKENS:
      for i in range(len(prompts)):
        out.tokens[i] = tokenizer.encode(queue.pop(0) if queue else "", add_special_tokens=False)
    return out

  monkeypatch.setattr(sampling.Sampler, "__call__", wrapper)


def test_answer_forced_grades(tiny_pair, tokenizer, tmp_path, monkeypatch):
  teacher, _, _ = tiny_pair
  # Gold answers 0, 3, 6, 9; the forced boxes say 0, 3, 7, 9.
  fake_forcing(monkeypatch, tokenizer, ["0}", "3}.", "7}", "9} dollars"])
  path = str(tmp_path / "graded.jsonl")
  meta = run_traces(teacher, tokenizer, make_examples(4), path, dataset="gsm8k",
                                seed=5, **KW)
  rows = traces.read_traces(path)
  assert [r["forced"] for r in rows] == ["0}", "3}.", "7}", "9} dollars"]
  assert [r["forced_correct"] for r in rows] == [True, True, False, True]
  assert [r["correct"] for r in rows] == [grading.is_correct("gsm8k", r["solution"],
                                                                r["completion"]) for r in rows]
  assert meta["statistics"]["forced_accuracy"] == 0.75


def test_no_answer_forcing(tiny_pair, tokenizer, tmp_path):
  teacher, _, _ = tiny_pair
  path = str(tmp_path / "n.jsonl")
  meta = run_traces(teacher, tokenizer, make_examples(2), path, dataset="gsm8k",
                                answer_forcing=False, **KW)
  rows = traces.read_traces(path)
  assert "forced" not in rows[0] and meta["statistics"]["forced_accuracy"] is None


def test_a_proxy_without_rows_for_every_token_is_refused(tiny_pair, tokenizer, tmp_path):
  teacher, _, _ = tiny_pair
  short = random_checkpoints.make_tiny_checkpoint(tmp_path / "short", tokenizer=tokenizer, seed=2,
                                                  vocab_size=len(tokenizer) - 20, hidden_size=32,
                                                  intermediate_size=64)
  proxy = models.from_pretrained(short)
  grad, _ = gradients.proxy_gradient(proxy, [([5, 6, 7], [8, 9])], micro_batch_size=1)
  with pytest.raises(ValueError, match="vocab mismatch"):
    run_traces(teacher, tokenizer, make_examples(2), tmp_path / "t.jsonl",
                           dataset="gsm8k", proxy=proxy, grad=grad, lam=1.0, **KW)


def test_rows_whose_text_holds_unicode_line_separators_read_back(tmp_path):
  """A random model's completion may hold U+2028, U+0085 or U+001C, which JSON leaves
  unescaped: rows are split on "\\n" only."""
  rows = [dict(index=0, completion="a\u2028b\x85c\x1cd"), dict(index=1, completion="e")]
  path = tmp_path / "t.jsonl"
  path.write_bytes(b"".join(traces._row_line(r) for r in rows))
  assert traces.read_traces(path) == rows


def test_a_prefill_is_continued_and_kept_in_the_completion(tiny_pair, tokenizer, tmp_path):
  """The teacher continues prompt + prefill (the same draws as sampling from those ids), each
  row's completion begins with the prefill, its prompt_ids do not, and its log-prob counts only
  the sampled tokens; an empty prefill is no prefill, to the bit."""
  teacher, _, _ = tiny_pair
  examples = make_examples(3)
  kw = dict(KW, dataset="gsm8k", seed=5, max_prompt_length=64)
  plain = run_traces(teacher, tokenizer, examples, str(tmp_path / "plain.jsonl"), **kw)
  empty = run_traces(teacher, tokenizer, examples, str(tmp_path / "empty.jsonl"), prefill="",
                     **kw)
  assert without_timing(empty) == without_timing(plain)
  assert (tmp_path / "empty.jsonl").read_bytes() == \
      (tmp_path / "plain.jsonl").read_bytes()
  text = "Okay, so"
  meta = run_traces(teacher, tokenizer, examples, str(tmp_path / "pre.jsonl"), prefill=text,
                    **kw)
  assert meta["config"]["prefill"] == text
  pre = tokenizer.encode(text, add_special_tokens=False)
  rows, base = traces.read_traces(tmp_path / "pre.jsonl"), traces.read_traces(
      tmp_path / "plain.jsonl")
  gen = sampling.generate(teacher, [r["prompt_ids"] + pre for r in rows],
                          sampling.SamplingParams(max_new_tokens=12, tau=1.0, top_p=0.9, seed=5),
                          tokenizer, batch_size=2)
  for r, b, ids, logp in zip(rows, base, gen.tokens, gen.logprobs):
    assert r["prompt_ids"] == b["prompt_ids"]
    assert r["completion_ids"] == pre + list(ids) and r["completion"].startswith(text)
    assert r["completion"] == tokenizer.decode(pre + list(ids), skip_special_tokens=True)
    assert r["teacher_logprob"] == pytest.approx(float(np.sum(logp)), rel=1e-5)
  # The prefill counts against the prompt limit: at the prompts' own length none fits.
  limit = max(len(r["prompt_ids"]) for r in base)
  with pytest.raises(errors.BadValue, match=f"all 3 prompts .* longer than {limit} tokens less "
                     f"the prefill's {len(pre)}"):
    run_traces(teacher, tokenizer, examples, str(tmp_path / "tight.jsonl"), prefill=text,
               **dict(kw, max_prompt_length=limit))
