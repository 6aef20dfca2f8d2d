"""The answer-aligned g: the answer's tokens are found where the grader says the answer
starts, the gradient is the proxy's on those tokens only, rescaled to the given norm, and a
trace that is all answer gives standard g back."""

import jax
import numpy as np
import pytest

from antidistill_jax import aligned, gradients, grading, models

TEXTS = ["3+4=7;7+2=9#9", "1+1=2,2+5=7#7", "8+1=9;9+9=18;18+3=21#21", "no answer here"]


def rows_of(tokenizer, texts, prompt=(5, 6, 7)):
  out = []
  for text in texts:
    ids = tokenizer.encode(text, add_special_tokens=False)
    out.append(dict(prompt_ids=list(prompt), completion_ids=ids,
                    completion=tokenizer.decode(ids, skip_special_tokens=True)))
  return out


def test_answer_tokens_start_at_the_token_holding_the_answer(tokenizer):
  rows = rows_of(tokenizer, TEXTS)
  examples, missing = aligned.answer_examples(tokenizer, rows, "synthetic")
  assert missing == 1 and len(examples) == 3
  for row, (context, answer) in zip(rows, examples):
    text, ids = row["completion"], row["completion_ids"]
    start = grading.answer_start("synthetic", text)
    k = len(context) - len(row["prompt_ids"])
    assert context[:3] == row["prompt_ids"] and context[3:] + answer == ids
    assert len(tokenizer.decode(ids[:k])) <= start < len(tokenizer.decode(ids[:k + 1]))
    assert tokenizer.decode(answer).endswith(text[start:])


def test_aligned_g_is_the_answer_gradient_at_the_standard_norm(tokenizer, teacher_proxy_dirs):
  proxy = models.from_pretrained(teacher_proxy_dirs[1])
  rows = rows_of(tokenizer, TEXTS[:3])
  g, meta = aligned.aligned_gradient(proxy, tokenizer, rows, "synthetic", 2.5,
                                     micro_batch_size=4)
  np.testing.assert_allclose(float(gradients.global_norm(g)), 2.5, rtol=1e-5)
  examples, _ = aligned.answer_examples(tokenizer, rows, "synthetic")
  direct, direct_meta = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direct)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b) * meta["scale"], rtol=1e-5,
                               atol=1e-9)
  assert meta["answer_norm"] == direct_meta["global_norm"] and meta["without_answer"] == 0
  # Not standard g: the reasoning tokens' loss is left out.
  whole, _ = gradients.proxy_gradient(
      proxy, [(r["prompt_ids"], r["completion_ids"]) for r in rows], micro_batch_size=4)
  cos = sum(float(np.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(whole)))
  cos /= float(gradients.global_norm(g)) * float(gradients.global_norm(whole))
  assert cos < 0.99
  with pytest.raises(ValueError, match="no answer-aligned g"):
    aligned.aligned_gradient(proxy, tokenizer, rows_of(tokenizer, TEXTS[3:]), "synthetic", 1.0)


def test_a_trace_that_is_all_answer_gives_standard_g(tokenizer, teacher_proxy_dirs):
  proxy = models.from_pretrained(teacher_proxy_dirs[1])
  rows = rows_of(tokenizer, ["#9", "#17", "#3"])
  g, _ = gradients.proxy_gradient(proxy, [(r["prompt_ids"], r["completion_ids"]) for r in rows],
                                  micro_batch_size=4)
  norm = float(gradients.global_norm(g))
  a, meta = aligned.aligned_gradient(proxy, tokenizer, rows, "synthetic", norm,
                                     micro_batch_size=4)
  np.testing.assert_allclose(meta["scale"], 1.0, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-9)


def test_answer_start_per_grader():
  assert grading.answer_start("synthetic", "1+2=3#3") == 5
  assert grading.answer_start("synthetic", "1+2=3") is None
  assert grading.answer_start("gsm8k", r"so \boxed{2} then \boxed{3}") == 18
  assert grading.answer_start("gsm8k", "x\n#### 4") == 2
  assert grading.answer_start("math", "no answer") is None
