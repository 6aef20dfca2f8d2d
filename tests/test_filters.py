"""The sort-free top-k / top-p filter keeps the same tokens as the sorting reference and as
transformers' warpers.

Kept sets are compared exactly, with one allowance: a token whose preceding probability mass
(float64, sorted order) lies within float32 rounding of top_p may be decided either way, since
the two implementations sum the masses in different orders. Every comparison also checks that
such tokens are rare.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from antidistill_jax import filters

TOP_PS = (0.1, 0.5, 0.9, 0.95, 0.999, 1.0)
BAND = 1e-5  # |mass before - top_p| below which float32 rounding may decide


def boundary_tokens(logits, top_k, top_p):
  """[B, V] bool: tokens (with their ties) whose float64 preceding mass is within BAND of top_p."""
  x = np.asarray(logits, np.float64)
  if top_k is not None and top_k < x.shape[-1]:
    kth = -np.sort(-x, axis=-1)[:, top_k - 1:top_k]
    x = np.where(x < kth, -np.inf, x)
  out = np.zeros(x.shape, bool)
  for b, row in enumerate(x):
    desc = -np.sort(-row)
    if not np.isfinite(desc[0]):
      continue
    prob = np.exp(desc - desc[0])
    prob /= prob.sum()
    before = np.cumsum(prob) - prob
    out[b] = np.isin(row, desc[np.abs(before - top_p) < BAND])
  return out


def assert_same_kept(got, want, logits, top_k, top_p):
  kept_got = np.asarray(got) > -np.inf
  kept_want = np.asarray(want) > -np.inf
  differ = kept_got != kept_want
  if differ.any():
    band = boundary_tokens(logits, top_k, top_p)
    assert not (differ & ~band).any(), (
        f"top_k={top_k} top_p={top_p}: {int((differ & ~band).sum())} tokens differ away from "
        f"the rounding band (rows {np.nonzero((differ & ~band).any(-1))[0].tolist()})")
    assert differ.sum() <= max(2, 0.01 * kept_want.sum()), "too many tokens at the boundary"
  kept = np.asarray(got)[kept_got]
  np.testing.assert_array_equal(kept, np.asarray(logits)[kept_got])  # kept logits unchanged


@functools.cache
def jitted(top_k):
  """One program per (shape, top_k): top_p is traced, as in the sampler."""
  return (jax.jit(lambda x, p: filters.filter_logits(x, top_k, p)),
          jax.jit(lambda x, p: filters.filter_logits_sorted(x, top_k, p)))


def check(logits, top_k, top_ps=TOP_PS):
  ours, reference = jitted(top_k)
  logits = jnp.asarray(logits, jnp.float32)
  for top_p in top_ps:
    p = jnp.float32(top_p)
    assert_same_kept(ours(logits, p), reference(logits, p), logits, top_k, top_p)


def random_logits(seed, batch, vocab):
  """Rows of varied shapes: near uniform, moderately and strongly peaked, heavy-tailed."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([0.3, 1.0, 3.0, 8.0], size=(batch, 1))
  logits = scale * rng.standard_normal((batch, vocab))
  zipf = -1.1 * np.log(rng.permuted(np.tile(np.arange(1, vocab + 1), (batch, 1)), axis=1))
  return np.where(rng.random((batch, 1)) < 0.25, zipf, logits).astype(np.float32)


@pytest.mark.parametrize("batch,vocab", [(1, 17), (7, 17), (1, 4096), (7, 4096)])
@pytest.mark.parametrize("top_k", [None, 1, 50])
def test_matches_sorted_on_random_logits(batch, vocab, top_k):
  for seed in range(3):
    check(random_logits(seed, batch, vocab), top_k)


def test_matches_sorted_at_qwen_vocabulary():
  # One near-uniform row (the search's hardest case), padding rows masked as the sampler does.
  logits = 0.5 * np.random.default_rng(3).standard_normal((1, 152064)).astype(np.float32)
  logits[:, 151936:] = -np.inf
  check(logits, None, top_ps=(0.5, 0.95))


def adversarial_batches(vocab=4096):
  """Two [7, V] batches of hard rows (the shape of the random tests: no new compilation)."""
  rng = np.random.default_rng(0)
  normal = rng.standard_normal
  rows = [
      1e-6 * normal(vocab),  # nearly flat
      np.concatenate([[20.0], normal(vocab - 1)]),  # one dominant token
      np.concatenate([[1.0, 0.5], np.full(vocab - 2, -np.inf)]),  # two tokens
      np.concatenate([normal(3000), np.full(vocab - 3000, -np.inf)]),  # masked tail
      np.concatenate([normal(3000), np.full(vocab - 3000, -1e30)]),  # masked by a huge negative
      # The 32 candidates hold less than top_p of a mass small enough for the candidate stage
      # to run: the search goes on below them.
      np.concatenate([[0.0], np.log(0.1) + 0.01 * normal(200), np.full(vocab - 201, -30.0)]),
      np.concatenate([[3.0], np.full(40, 2.0), rng.uniform(-9, -8, vocab - 41)]),  # tied nucleus
      np.zeros(vocab),  # all equal
      np.where(rng.random(vocab) < 0.5, 1.0, 0.0),  # two values
      np.full(vocab, -np.inf),  # fully masked
      np.concatenate([[5.0], np.full(vocab - 1, 4.0)]),  # one token above a flat plateau
      np.round(normal(vocab), 1),  # many ties everywhere
      np.linspace(-30, 30, vocab),  # exponential weights
      np.log(np.arange(1, vocab + 1) ** -1.0),  # zipf
  ]
  logits = np.stack([rng.permutation(r) for r in rows]).astype(np.float32)
  return logits[:7], logits[7:]


@pytest.mark.parametrize("top_k", [None, 1, 50])
def test_adversarial_rows(top_k):
  for logits in adversarial_batches():
    check(logits, top_k)


def test_rows_whose_smallest_value_is_zero():
  # The search's lower end starts just below the row's minimum; below 0.0 the next float is
  # subnormal and XLA:CPU flushes it to -0.0, which left the zeros out of the bracket.
  rng = np.random.default_rng(4)
  for vocab, ones in ((64, (35, 40, 20, 60, 1)), (512, (236, 300, 100, 500, 12))):
    rows = [rng.permutation(np.r_[np.ones(n), np.zeros(vocab - n)]) for n in ones]
    rows.append(np.r_[0.0, rng.uniform(0.0, 3.0, vocab - 1)])
    check(np.stack(rows), None)


def test_all_equal_logits_keep_everything():
  for top_k in (None, 1, 50):
    out = jitted(top_k)[0](jnp.zeros((7, 4096)), jnp.float32(0.5))
    assert bool(jnp.all(out == 0.0))


def test_search_goes_below_the_candidates():
  logits = adversarial_batches()[0]
  kept = np.asarray(jitted(None)[0](jnp.asarray(logits), jnp.float32(0.95)) > -np.inf).sum(-1)
  assert 180 < kept[5] <= 201  # far more than the 32 candidates


def test_traced_top_p_compiles_once_and_one_keeps_everything():
  f = jitted(None)[0]
  logits = jnp.asarray(random_logits(5, 7, 4096))
  f(logits, jnp.float32(0.5))
  compiled = f._cache_size()
  for top_p in (0.2, 0.9, 1.0, 1.5):
    out = f(logits, jnp.float32(top_p))
    if top_p >= 1.0:
      np.testing.assert_array_equal(out, logits)
  assert f._cache_size() == compiled


def test_static_top_p_one_and_none_are_identity():
  logits = jnp.asarray(random_logits(6, 2, 300))
  np.testing.assert_array_equal(filters.filter_logits(logits, None, None), logits)
  np.testing.assert_array_equal(filters.filter_logits(logits, None, 1.0), logits)


def test_top_k_only():
  logits = jnp.asarray(random_logits(7, 7, 4096))
  for top_k in (1, 50):
    assert_same_kept(filters.filter_logits(logits, top_k, None),
                     filters.filter_logits_sorted(logits, top_k, None), logits, top_k, 1.0)


def test_bfloat16_logits():
  logits = jnp.asarray(random_logits(7, 7, 4096)).astype(jnp.bfloat16)
  got = jax.jit(lambda x, p: filters.filter_logits(x, 50, p))(logits, jnp.float32(0.9))
  assert got.dtype == jnp.bfloat16
  logits32 = logits.astype(jnp.float32)
  want = jitted(50)[1](logits32, jnp.float32(0.9))
  assert_same_kept(got.astype(jnp.float32), want, logits32, 50, 0.9)


def test_top_values_is_exact_with_ties():
  x = jnp.asarray(np.random.default_rng(8).integers(0, 20, (3, 4096)).astype(np.float32))
  for k in (1, 50):  # direct and two-stage
    np.testing.assert_array_equal(filters.top_values(x, k), jax.lax.top_k(x, k)[0])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's TopK lowering")
def test_compiled_filter_has_no_sort():
  hlo = jitted(None)[0].lower(jnp.zeros((7, 4096)), jnp.float32(0.9)).compile().as_text()
  assert " sort(" not in hlo


def test_hugging_face_warper_chain():
  """temperature -> top-k -> top-p, as `generate` applies them (the authors' sampler: top-k 50,
  top-p 0.95), against transformers' own processors on the same logits."""
  torch = pytest.importorskip("torch")
  from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                      TopPLogitsWarper)
  logits = random_logits(9, 7, 4096)
  logits[:, 4000:] = -np.inf  # padding rows, as the sampler masks them
  ids = torch.zeros((7, 1), dtype=torch.long)
  for tau in (0.6, 1.0, 1.4):
    tempered = jnp.asarray(logits) / tau
    for top_k, top_p in ((50, 0.95), (50, 0.5), (None, 0.95), (None, 0.3)):
      scores = TemperatureLogitsWarper(tau)(ids, torch.from_numpy(logits))
      if top_k is not None:
        scores = TopKLogitsWarper(top_k)(ids, scores)
      scores = TopPLogitsWarper(top_p)(ids, scores)
      ours = jitted(top_k)[0](tempered, jnp.float32(top_p))
      # XLA's float32 division may differ from torch's by an ulp: the band absorbs it.
      assert_same_kept(ours, scores.numpy(), tempered, top_k, top_p)
