"""The sampler's draw gives the tokens of the filter-then-categorical draw it replaced.

`draw.categorical` is `jax.random.categorical` per row; `draw.filtered_categorical` draws by
Gumbel-max first and checks only the drawn token against the top-k / top-p set, so with the same
keys it must return the tokens of categorical(key, logits masked to
`filters.filter_logits(support)`'s kept set). Tokens are compared exactly; a token whose
preceding mass lies within float32 rounding of top_p may be decided either way (as between
`filters` and the sorting reference), and such tokens must be rare.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from antidistill_jax import filters
from antidistill_jax.sampling import draw
from test_filters import adversarial_batches, boundary_tokens, random_logits


@functools.cache
def programs(top_k):
  """(ours, the old way), jitted once per top_k; top_p traced, as in the sampler. support None:
  the filter runs on the sampled logits themselves (delta_on="vocab", the default)."""
  categorical = jax.vmap(jax.random.categorical)

  def old_way(keys, logits, support, p):
    if support is None:
      return categorical(keys, filters.filter_logits(logits, top_k, p)).astype(jnp.int32)
    kept = filters.filter_logits(support, top_k, p)
    return categorical(keys, jnp.where(jnp.isfinite(kept), logits, -jnp.inf)).astype(jnp.int32)

  ours = lambda keys, logits, support, p: draw.filtered_categorical(keys, logits, support,
                                                                    top_k, p)
  return jax.jit(ours), jax.jit(old_way)


def compare(logits, support, top_k, top_p, seeds=range(4)):
  """Asserts equal tokens over several key sets (support None: the logits' own set); returns
  how many rows' unfiltered draw fell outside the kept set (with top_k None: the first
  candidates the check rejected), so a test can show the second stage ran."""
  ours, old_way = programs(top_k)
  logits = jnp.asarray(logits, jnp.float32)
  support = None if support is None else jnp.asarray(support, jnp.float32)
  chooser = logits if support is None else support
  p = jnp.float32(top_p)
  kept_BV = np.isfinite(np.asarray(filters.filter_logits(chooser, top_k, p)))
  rejected = 0
  for seed in seeds:
    keys = jax.random.split(jax.random.key(seed), logits.shape[0])
    got, want = np.asarray(ours(keys, logits, support, p)), np.asarray(old_way(keys, logits,
                                                                               support, p))
    first = np.asarray(draw.categorical(keys, logits))
    rejected += int((~kept_BV[np.arange(len(first)), first]).sum())
    differ = np.nonzero(got != want)[0]
    if len(differ):
      band = boundary_tokens(chooser, top_k, top_p)
      assert all(band[r, got[r]] or band[r, want[r]] for r in differ), (
          f"top_k={top_k} top_p={top_p} seed={seed}: rows {differ.tolist()} drew "
          f"{got[differ].tolist()} where the old way drew {want[differ].tolist()}")
      assert len(differ) <= 1, "too many tokens at the rounding boundary"
  return rejected


def test_categorical_is_jax_random_categorical():
  rng = np.random.default_rng(0)
  logits = (3.0 * rng.standard_normal((9, 1000))).astype(np.float32)
  logits[:, 990:] = -np.inf  # masked vocabulary
  logits[1, :] = 0.0  # ties everywhere: the first maximum of the perturbed row
  logits[2, 5] = np.nan  # a NaN: jnp.argmax's first-NaN rule
  logits[3, :] = -np.inf  # nothing to draw: index 0, as jax.random.categorical
  # A NaN after the maximum: XLA:CPU's row max may skip it, and first_argmax takes whichever
  # comes first (the first maximum here) where jnp.argmax takes the NaN.
  logits[4, 3], logits[4, 900] = 50.0, np.nan
  for seed in range(5):
    keys = jax.random.split(jax.random.key(seed), 9)
    got = np.asarray(jax.jit(draw.categorical)(keys, jnp.asarray(logits)))
    want = np.asarray(jax.vmap(jax.random.categorical)(keys, jnp.asarray(logits)))
    rows = np.arange(9) != 4
    np.testing.assert_array_equal(got[rows], want[rows])
    assert got[2] == 5 and got[4] in (3, 900)


@pytest.mark.parametrize("top_k", [None, 1, 50])
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.95, 1.0])
def test_same_tokens_as_filter_then_categorical(top_k, top_p):
  # No support: the sampled logits choose their own set (delta_on="vocab"); then a support that
  # differs from them (delta_on="nucleus": the teacher's own logits choose the set).
  for seed, (batch, vocab) in enumerate([(1, 17), (7, 4096), (32, 4096)]):
    logits = random_logits(seed, batch, vocab)
    compare(logits, None, top_k, top_p)
    noise = np.random.default_rng(seed + 10).standard_normal(logits.shape).astype(np.float32)
    compare(logits + 2.0 * noise, logits, top_k, top_p)


@pytest.mark.parametrize("top_k", [None, 50])
def test_adversarial_rows(top_k):
  for logits in adversarial_batches():
    for top_p in (0.1, 0.5, 0.95, 1.0):
      compare(logits, None, top_k, top_p)
      compare(logits, logits, top_k, top_p)  # the same set, chosen on a separate support


def test_more_rejected_rows_than_one_wave():
  # Sampled logits far from the support's: most first candidates fall outside its nucleus, so
  # the rejected rows take several waves of retry_rows(32) = 4.
  rng = np.random.default_rng(5)
  support = (3.0 * rng.standard_normal((32, 4096))).astype(np.float32)
  logits = (3.0 * rng.standard_normal((32, 4096))).astype(np.float32)
  rejected = compare(logits, support, None, 0.5)
  assert rejected > 4 * 3 * draw.retry_rows(32), rejected  # > 3 waves a key set on average


@pytest.mark.parametrize("narrowings", [0, 1, draw.NARROWINGS])
def test_rows_the_narrowing_does_not_settle_go_to_the_filter(monkeypatch, narrowings):
  # Row d: a descending support whose nucleus is its first n tokens, and sampled logits that
  # rise by 50 a token (no Gumbel draw reorders them) up to token n + d - 1: the first
  # candidate is d tokens outside, each narrowing moves one token in, so rows with
  # d <= narrowings settle there and the rest need the filter. Every row must draw token n - 1.
  monkeypatch.setattr(draw, "NARROWINGS", narrowings)
  vocab, top_p = 256, 0.5
  support = np.tile(-0.01 * np.arange(vocab, dtype=np.float32), (8, 1))
  n = int(np.isfinite(np.asarray(filters.filter_logits(jnp.asarray(support[:1]), None,
                                                       jnp.float32(top_p)))).sum())
  logits = np.full_like(support, -1e4)
  for d in range(8):
    logits[d, :n + d] = 50.0 * np.arange(n + d)
  ours = jax.jit(lambda k, l, x: draw.filtered_categorical(k, l, x, None, jnp.float32(top_p)))
  for seed in range(2):
    keys = jax.random.split(jax.random.key(seed), 8)
    got = np.asarray(ours(keys, jnp.asarray(logits), jnp.asarray(support)))
    np.testing.assert_array_equal(got, n - 1)  # d = 0: the first candidate is kept
  assert 0 < n < vocab - 8


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("top_p", [0.9, 1.0, 1.5])
def test_supports_wider_than_exp_range(top_k, top_p):
  # Support values 88 or more apart overflow the check's weights: below p = 1 that proves the
  # candidate outside (narrowing may start), at p >= 1 (traced, keep everything) it proves
  # nothing and must not narrow. Sampled logits favour the lowest support value.
  support = np.array([[0.0, 100.0, 1.0, 2.0], [-1e30, 0.0, 0.0, 0.0],
                      [-200.0, 0.0, -100.0, 50.0], [3e38, -3e38, 0.0, 1.0]], np.float32)
  logits = np.zeros_like(support)
  logits[:, 0] = 50.0
  compare(logits, support, top_k, top_p, seeds=range(3))
  compare(support, None, top_k, top_p, seeds=range(3))


def test_qwen_vocabulary_with_padding_rows():
  rng = np.random.default_rng(3)
  logits = (0.5 * rng.standard_normal((4, 152064))).astype(np.float32)
  logits[:, 151936:] = -np.inf  # the sampler's masked padding ids
  assert compare(logits, None, None, 0.95, seeds=range(8)) > 0


def test_non_finite_support_rows_are_the_filters():
  # A support row with a NaN, and one with nothing finite: the check keeps no candidate there,
  # so the filter decides, as it did.
  rng = np.random.default_rng(7)
  support = (2.0 * rng.standard_normal((7, 4096))).astype(np.float32)
  support[0, 100] = np.nan
  support[1, :] = -np.inf
  logits = support + rng.standard_normal(support.shape).astype(np.float32)
  logits[0, 100] = 0.0
  compare(logits, support, None, 0.9)


@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.95, 1.0])
def test_check_is_the_filters_kept_set(top_p):
  # The first candidate's check alone: a token it wrongly rejected would still be drawn right
  # (the filter takes over), so the check is pinned here, at the tokens around each row's
  # crossing and at random ranks. "Outside" (narrowing may start) must be exactly "not kept"
  # for a finite candidate below p = 1, and never at p >= 1.
  check = jax.jit(draw.check)
  rng = np.random.default_rng(11)
  for x in [random_logits(4, 7, 4096), *adversarial_batches()]:
    x = jnp.asarray(x, jnp.float32)
    kept = np.isfinite(np.asarray(filters.filter_logits(x, None, jnp.float32(top_p))))
    band = boundary_tokens(x, None, top_p)
    order = np.argsort(-np.asarray(x), axis=-1, kind="stable")
    n = kept.sum(-1)
    ranks = [np.zeros_like(n), n - 2, n - 1, n, n + 1, np.full_like(n, x.shape[1] - 1),
             *rng.integers(0, x.shape[1], (20, x.shape[0]))]
    for r in ranks:
      c = order[np.arange(len(n)), np.clip(r, 0, x.shape[1] - 1)]
      got, outside = map(np.asarray, check(x, jnp.asarray(c, jnp.int32), jnp.float32(top_p)))
      want = kept[np.arange(len(n)), c]
      finite = np.isfinite(np.asarray(x).max(-1))  # other rows: the filter decides
      wrong = (got != want) & finite & ~band[np.arange(len(n)), c]
      assert not wrong.any(), (top_p, np.nonzero(wrong)[0].tolist(), c[wrong].tolist())
      assert not got[~finite].any()
      assert not (got & outside).any()
      if top_p >= 1.0:
        assert not outside.any()
      else:
        candidate_finite = np.isfinite(np.asarray(x)[np.arange(len(n)), c])
        decided = finite & candidate_finite & ~band[np.arange(len(n)), c]
        np.testing.assert_array_equal(outside[decided], ~want[decided])
    # At least one token: the row's maximum is kept even at top_p = 0 (where the band holds it).
    top = np.asarray(check(x, jnp.asarray(order[:, 0], jnp.int32), jnp.float32(top_p))[0])
    np.testing.assert_array_equal(top, np.isfinite(np.asarray(x).max(-1)))


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("top_p", [None, 1.0, 0.9, "traced"])
def test_non_finite_sampled_logits_without_a_support(top_k, top_p):
  # The filter on the sampled logits themselves left NaN and +inf tokens drawable (the decode
  # flags such steps; the tokens still must not change), a static or traced top_p.
  rng = np.random.default_rng(8)
  logits = rng.standard_normal((6, 128)).astype(np.float32)
  logits[0, 3], logits[1, 7], logits[2, 9], logits[2, 11] = np.nan, np.inf, np.nan, np.inf
  logits[3, :] = -np.inf
  logits = jnp.asarray(logits)
  p = jnp.float32(0.9) if top_p == "traced" else top_p
  for seed in range(3):
    keys = jax.random.split(jax.random.key(seed), 6)
    got = draw.filtered_categorical(keys, logits, None, top_k, p)
    want = jax.vmap(jax.random.categorical)(keys, filters.filter_logits(logits, top_k, p))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("top_p", [None, 1.0])
def test_static_top_p_with_top_k_and_a_support(top_p):
  rng = np.random.default_rng(9)
  support = rng.standard_normal((5, 64)).astype(np.float32)
  support[0, :40] = -np.inf
  support[1, 2] = np.nan
  logits = jnp.asarray(support + rng.standard_normal(support.shape).astype(np.float32))
  support = jnp.asarray(support)
  for top_k in (None, 3):
    keys = jax.random.split(jax.random.key(top_k or 0), 5)
    kept = filters.filter_logits(support, top_k, top_p)
    want = jax.vmap(jax.random.categorical)(keys, jnp.where(jnp.isfinite(kept), logits, -jnp.inf))
    got = draw.filtered_categorical(keys, logits, support, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
