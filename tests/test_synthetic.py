"""The synthetic chain task: seeded splits that share no problem, gold traces that grade
correct, writing options and the style probe, the one-token-per-byte tokenizer, and a short
from-scratch training run through distill that writes a loadable checkpoint."""

import re

import pytest

from antidistill_jax import grading, models, task_models
from antidistill_jax import tokenizer as tok_lib
from antidistill_jax.data import synthetic

STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


@pytest.fixture(scope="module")
def tok():
  return task_models.task_tokenizer()


def _steps(solution):
  return [tuple(map(int, m)) for m in STEP.findall(solution.rsplit("#", 1)[0])]


def test_sums_unchanged():
  e = synthetic.sums(3, split="train", seed=0)[0]
  assert e.problem.startswith("What is ") and e.solution.endswith(f"#### {e.answer}")
  assert grading.is_correct("gsm8k", e.solution, e.solution)
  assert grading.is_correct("synthetic", e.solution, e.solution)


def test_chains_deterministic_and_splits_disjoint():
  a = synthetic.chains(200, split="train", seed=3)
  assert a == synthetic.chains(200, split="train", seed=3)
  assert a != synthetic.chains(200, split="train", seed=4)
  problems = {s: {e.problem for e in synthetic.chains(300, split=s, seed=3)}
              for s in ("train", "holdout", "test")}
  assert not problems["train"] & problems["test"]
  assert not problems["train"] & problems["holdout"]
  assert not problems["holdout"] & problems["test"]
  assert all(synthetic.split_of(p, 3) == s for s, ps in problems.items() for p in ps)
  # The problems do not depend on how the traces are written.
  fixed = synthetic.chains(200, split="train", seed=3, order="fixed", separators=(";",),
                           direction="free")
  assert [e.problem for e in fixed] == [e.problem for e in a]


def test_gold_traces_are_right_and_grade_correct():
  for e in synthetic.chains(300, split="test", seed=0, direction="free"):
    terms = synthetic.parse_problem(e.problem)
    assert 3 <= len(terms) <= 5 and all(1 <= t <= 9 for t in terms)
    assert e.answer == str(sum(terms)) and e.solution.endswith("#" + e.answer)
    steps = _steps(e.solution)
    assert len(steps) == len(terms) - 1
    assert all(a + b == c for a, b, c in steps)
    assert steps[-1][2] == sum(terms)
    assert grading.is_correct("synthetic", e.solution, e.solution)
    assert grading.extract_answer("synthetic", e.solution) == e.answer


def test_options_change_the_writing():
  fixed = synthetic.chains(100, split="train", order="fixed", separators=(",",))
  for e in fixed:
    assert ";" not in e.solution
    s = synthetic.style(e.solution, e.problem)
    assert s["accumulator_first"] in (1.0, None) and s["direction"] in ("left", None)
  free = [synthetic.style(e.solution, e.problem)
          for e in synthetic.chains(200, split="train", direction="free")]
  assert {s["separator"] for s in free} == {";", ","}
  assert {s["direction"] for s in free} >= {"left", "right"}
  summary = synthetic.style_summary([e.solution for e in synthetic.chains(400, split="train")])
  assert 0.4 < summary["semicolon"] < 0.6 and 0.4 < summary["accumulator_first"] < 0.6
  assert synthetic.trace([3, 5, 2], accumulator_first=[True, False]) == "3+5=8;2+8=10#10"
  assert synthetic.trace([3, 5, 2], separator=",", reverse=True) == "2+5=7,7+3=10#10"


def test_style_probe():
  s = synthetic.style("3+5=8;2+8=10;10+7=17#17", "3+5+2+7")
  assert s == dict(separator=";", direction="left", steps=3, accumulator_first=2 / 3)
  s = synthetic.style("7+2=9,5+9=14,14+3=17#17", "3+5+2+7")
  assert s == dict(separator=",", direction="right", steps=3, accumulator_first=2 / 3)
  assert synthetic.style("no steps", "1+2+3")["separator"] is None
  assert synthetic.style("1+2=3;3+3=6,6+1=7#7")["separator"] == "mixed"


def test_task_tokenizer_one_token_per_character(tmp_path, tok):
  tok.save_pretrained(tmp_path)
  tok = tok_lib.load_tokenizer(tmp_path)
  for e in synthetic.chains(50, split="train", direction="free"):
    for text in (e.problem, e.solution):
      ids = tok.encode(text, add_special_tokens=False)
      assert len(ids) == len(text) and tok.decode(ids) == text
  other = "héllo \n\n**Final Answer**\n\\[\\boxed{17}"
  assert tok.decode(tok.encode(other, add_special_tokens=False)) == other
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  prompt = tok_lib.prompt_ids(tok, "3+5+2\n")
  assert tok.decode(prompt) == "<|im_start|>user\n3+5+2\n<|im_end|>\n<|im_start|>assistant\n"
  assert len(prompt) == 1 + 4 + 1 + 6 + 1 + 1 + 1 + 9 + 1


def test_pretraining_rows_are_easier_and_written_one_way(tok):
  rows = task_models.pretraining_rows(tok, 50, max_terms=3)
  assert len(rows) == 50 and all(r["finished"] for r in rows)
  for r in rows:
    assert len(synthetic.parse_problem(r["problem"])) in (2, 3) and ";" not in r["completion"]
    assert synthetic.style(r["completion"], r["problem"])["accumulator_first"] in (1.0, None)
    assert r["completion_ids"][-1] == tok.eos_token_id
    assert tok.decode(r["completion_ids"][:-1]) == r["completion"]


def test_train_from_scratch_writes_a_loadable_checkpoint(tmp_path, tok):
  rows = task_models.example_rows(tok, synthetic.chains(128, split="train"))
  held = task_models.example_rows(tok, synthetic.chains(16, split="holdout"))
  config = task_models.scratch_config(batch_size=16, learning_rate=1e-2, epochs=2, eval_every=8)
  shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  path = tmp_path / "student"
  # Stopped early: nothing written, a second call resumes and finishes.
  done, history = task_models.train_from_scratch(path, tokenizer=tok, rows=rows, holdout_rows=held,
                                                 model_type="llama", shape=shape, config=config,
                                                 max_steps=6)
  assert done is None and len(history) == 6
  done, history = task_models.train_from_scratch(path, tokenizer=tok, rows=rows, holdout_rows=held,
                                                 model_type="llama", shape=shape, config=config)
  assert done == str(path) and len(history) == 16
  assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
  evals = [h["holdout_loss"] for h in history if "holdout_loss" in h]
  assert evals[-1] < evals[0]
  model = models.from_pretrained(path)
  assert model.config.model_type == "llama" and model.config.hidden_size == 32
  assert len(tok_lib.load_tokenizer(path)) == len(tok)
  # A finished path is returned as is, with its history.
  again, history_again = task_models.train_from_scratch(path, tokenizer=tok, rows=rows)
  assert again == str(path) and history_again == history
  acc, texts = task_models.accuracy(model, tok, synthetic.chains(4, split="test"), max_new_tokens=8)
  assert 0.0 <= acc <= 1.0 and len(texts) == 4
  # start_from continues from a checkpoint (a pre-trained student): it starts where it ended.
  _, more = task_models.train_from_scratch(tmp_path / "more", tokenizer=tok, rows=rows[:32],
                                           config=config, start_from=str(path))
  assert more[0]["train_loss"] < 0.7 * history[0]["train_loss"]


def test_a_stream_draws_other_problems_of_the_same_split():
  base = synthetic.chains(200, split="train", seed=0)
  other = synthetic.chains(200, split="train", seed=0, stream=1)
  assert [e.problem for e in base] != [e.problem for e in other]
  assert all(synthetic.split_of(e.problem, 0) == "train" for e in other)
  assert [e.problem for e in synthetic.chains(200, split="train", seed=0, stream=1)] == \
      [e.problem for e in other]


def test_token_roles_mark_the_answer_and_the_writing_choices():
  trace = "3+5=8;2+8=10#10"
  roles = synthetic.token_roles(trace)
  assert len(roles) == len(trace)
  assert "".join(c for c, r in zip(trace, roles) if r == "answer") == "#10"
  assert "".join(c for c, r in zip(trace, roles) if r == "writing") == "3;2"
  assert "".join(c for c, r in zip(trace, roles) if r == "reasoning") == "+5=8+8=10"
  assert synthetic.token_roles("12+3=15,15+4=19#19")[:3] == ["writing", "reasoning", "reasoning"]
  assert set(synthetic.token_roles("no steps")) == {"writing", "reasoning"}
