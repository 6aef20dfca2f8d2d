"""Antidistillation sampling: Delta exactness (fd and jvp), cached vs recomputed Delta,
lam=0 identity, sampling distributions for both placements, NaN guard, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import gradients, models, parallel, sampling
from conftest import random_examples


@pytest.fixture(scope="module")
def pair(teacher_proxy_dirs):
  teacher = models.from_pretrained(teacher_proxy_dirs[0])
  proxy = models.from_pretrained(teacher_proxy_dirs[1])
  grad, _ = gradients.proxy_gradient(proxy, random_examples(8, seed=4), micro_batch_size=8)
  return teacher, proxy, grad


def _centered_cosine(a, b):
  a = np.asarray(a, np.float64) - np.mean(a, -1, keepdims=True)
  b = np.asarray(b, np.float64) - np.mean(b, -1, keepdims=True)
  return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_delta_equals_brute_force_inner_product(pair):
  _, proxy, grad = pair
  ids = jnp.asarray([[5, 17, 40, 2, 99, 7], [8, 8, 120, 33, 4, 61]])
  graphdef, theta = nnx.split(proxy)
  logp = lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p)(ids)[:, -1], -1)  # [B, V]
  jac = jax.jacrev(logp)(theta)  # per leaf [B, V, *leaf]
  exact = sum(jnp.einsum("bv...,...->bv", j, g)
              for j, g in zip(jax.tree.leaves(jac), jax.tree.leaves(grad)))
  for method, kw in (("fd", dict(eps=1e-3)), ("jvp", {})):
    approx = sampling.delta(proxy, grad, ids, method=method, **kw)
    assert approx.shape == (2, proxy.config.vocab_size)
    assert np.all(_centered_cosine(approx, exact) >= 0.999), method
  # jvp is exact: equal up to fp32 round-off, not just aligned.
  np.testing.assert_allclose(sampling.delta(proxy, grad, ids, method="jvp"), exact,
                             atol=1e-4 * float(jnp.max(jnp.abs(exact))))


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_cached_delta_equals_full_recompute_at_every_position(pair, method):
  _, proxy, grad = pair
  s = sampling.DecodeSettings(max_new_tokens=6, lam=1.0, eps=1e-2, method=method)
  graphdef, theta = nnx.split(proxy)
  if method == "fd":
    plus, minus = sampling.perturbed_states(theta, grad, s.eps)
    state = jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus)
  else:
    state = (theta, grad)
  proxies = sampling._Proxies(graphdef, s)
  prompts = [[5, 17, 40, 2], [8, 120, 33, 4, 61, 9, 10]]
  ids, mask = sampling.left_pad(prompts, pad_id=0)
  new = np.array([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
  d, cache = proxies.prefill(state, jnp.asarray(ids), jnp.asarray(mask), ids.shape[1] + 6)
  cached = [d]
  for t in range(new.shape[1]):
    d, cache = proxies.decode(state, jnp.asarray(new[:, t]), cache)
    cached.append(d)
  # Every prefix of every row, recomputed from scratch in one left-padded batch.
  prefixes = [prompt + new[i, :t].tolist() for i, prompt in enumerate(prompts)
              for t in range(new.shape[1] + 1)]
  p_ids, p_mask = sampling.left_pad(prefixes, pad_id=0)
  full = np.asarray(sampling.delta(proxy, grad, p_ids, eps=s.eps, method=method,
                                   pad_mask_BT=jnp.asarray(p_mask)))
  got = np.stack([np.asarray(cached[t])[i] for i in range(len(prompts))
                  for t in range(new.shape[1] + 1)])
  # Cached Delta uses logits, the full one log-probs: equal up to a per-row constant.
  got, full = got - got.mean(-1, keepdims=True), full - full.mean(-1, keepdims=True)
  np.testing.assert_allclose(got, full, atol=1e-3 * np.abs(full).max())


def test_lam_zero_with_proxy_is_the_plain_sampler(pair):
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  kw = dict(max_new_tokens=12, tau=1.0, top_p=0.95, seed=4)
  plain = sampling.generate(teacher, prompts, **kw)
  with_proxy = sampling.generate(teacher, prompts, proxy=proxy, grad=grad, lam=0.0, **kw)
  assert with_proxy.tokens == plain.tokens


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_ads_perturbs_and_stays_in_the_shared_vocab(pair, method):
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=16, tau=1.0, seed=4)
  plain = sampling.generate(teacher, prompts, **kw)
  ads = sampling.generate(teacher, prompts, proxy=proxy, grad=grad, lam=3.0, method=method, **kw)
  assert ads.tokens != plain.tokens
  assert max(max(t) for t in ads.tokens) < proxy.config.vocab_size  # 352 < 384 teacher rows


def _expected_first_token(teacher, proxy, grad, prompt, *, tau, lam, eps, placement):
  z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1], np.float64)
  d = np.asarray(sampling.delta(proxy, grad, jnp.asarray([prompt]), eps=eps), np.float64)[0]
  d = np.pad(d, (0, len(z) - len(d)))
  logp = z - np.logaddexp.reduce(z)
  logits = logp / tau + lam * d if placement == "paper" else (z + lam * d) / tau
  logits[proxy.config.vocab_size:] = -np.inf
  p = np.exp(logits - logits.max())
  return p / p.sum()


@pytest.mark.parametrize("placement", ["paper", "reference"])
def test_first_token_frequencies_match_the_adjusted_distribution(pair, placement):
  teacher, proxy, grad = pair
  prompt, n, tau, lam, eps = [7, 8, 9, 10], 4000, 0.8, 2.0, 1e-2
  expected = _expected_first_token(teacher, proxy, grad, prompt, tau=tau, lam=lam, eps=eps,
                                   placement=placement)
  plain = _expected_first_token(teacher, proxy, grad, prompt, tau=tau, lam=0.0, eps=eps,
                                placement=placement)
  out = sampling.generate(teacher, [prompt] * n, max_new_tokens=1, tau=tau, seed=5, proxy=proxy,
                          grad=grad, lam=lam, eps=eps, placement=placement)
  freqs = np.bincount([t[0] for t in out.tokens], minlength=len(expected)) / n
  tv = 0.5 * np.abs(freqs - expected).sum()
  bound = 1.5 * np.sqrt(np.sum(expected > 1e-4) / n)
  assert tv < bound
  # The perturbation is large enough that the unperturbed distribution would fail the test.
  assert 0.5 * np.abs(freqs - plain).sum() > 2 * bound


def test_greedy_ads_is_argmax_of_logp_plus_lam_delta(pair):
  teacher, proxy, grad = pair
  prompts = [[7, 8, 9, 10], [3, 4]]
  out = sampling.generate(teacher, prompts, max_new_tokens=1, tau=0.0, proxy=proxy, grad=grad,
                          lam=5.0, eps=1e-2)
  for prompt, tokens in zip(prompts, out.tokens):
    z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1])
    d = np.asarray(sampling.delta(proxy, grad, jnp.asarray([prompt])))[0]
    logp = z[: len(d)] - np.logaddexp.reduce(z)
    assert tokens[0] == int(np.argmax(logp + 5.0 * d))


def test_non_finite_logits_raise_with_the_settings(pair):
  teacher, proxy, grad = pair
  with pytest.raises(FloatingPointError, match=r"step 0 .*lam=1e\+38, eps=0.01.*float32"):
    sampling.generate(teacher, [[5, 6, 7]], max_new_tokens=4, proxy=proxy, grad=grad, lam=1e38)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), grad)
  with pytest.raises(FloatingPointError, match="non-finite sampling logits"):
    sampling.generate(teacher, [[5, 6, 7]], max_new_tokens=4, proxy=proxy, grad=bad, lam=1.0)


def test_sharded_ads_equals_single_device(pair):
  teacher, proxy, grad = pair
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=8, tau=1.0, seed=2, proxy=proxy, grad=grad, lam=2.0)
  assert (sampling.generate(teacher, prompts, mesh=mesh, **kw).tokens
          == sampling.generate(teacher, prompts, **kw).tokens)


def test_mismatched_gradient_is_refused_by_the_sampler(pair):
  teacher, proxy, grad = pair
  with pytest.raises(ValueError, match="gradient does not match the proxy's parameters"):
    sampling.generate(teacher, [[5]], max_new_tokens=2, proxy=teacher, grad=grad, lam=1.0)


def test_fd_as_two_calls_equals_the_stacked_call(pair):
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  kw = dict(max_new_tokens=10, tau=1.0, seed=9, proxy=proxy, grad=grad, lam=3.0)
  assert (sampling.generate(teacher, prompts, fd_stacked=False, **kw).tokens
          == sampling.generate(teacher, prompts, **kw).tokens)


def test_lam_zero_compiles_no_proxy_work(pair):
  teacher, proxy, grad = pair
  batch = sampling.batch_inputs([[5, 6, 7]], rows=1, seed=0)
  plain = sampling.build_program(teacher, max_new_tokens=4)
  zero = sampling.build_program(teacher, max_new_tokens=4, proxy=proxy, grad=grad, lam=0.0)
  ads = sampling.build_program(teacher, max_new_tokens=4, proxy=proxy, grad=grad, lam=1.0)
  assert zero.proxy_state is None
  assert zero.lower(*batch).as_text() == plain.lower(*batch).as_text()
  assert ads.lower(*batch).as_text() != plain.lower(*batch).as_text()


def test_tensor_parallel_models_give_the_same_gradient_and_samples(pair, teacher_proxy_dirs):
  teacher, proxy, grad = pair
  mesh = parallel.make_mesh(data=2, model=4)
  teacher_tp = models.from_pretrained(teacher_proxy_dirs[0], mesh=mesh)
  proxy_tp = models.from_pretrained(teacher_proxy_dirs[1], mesh=mesh)
  assert teacher_tp.layers[0].mlp.up_proj.kernel[...].sharding.spec[1] == "model"
  grad_tp, _ = gradients.proxy_gradient(proxy_tp, random_examples(8, seed=4), micro_batch_size=8,
                                        mesh=mesh)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_tp)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * np.abs(np.asarray(a)).max())
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=8, tau=1.0, seed=2, lam=2.0)
  assert (sampling.generate(teacher_tp, prompts, proxy=proxy_tp, grad=grad_tp, mesh=mesh, **kw).tokens
          == sampling.generate(teacher, prompts, proxy=proxy, grad=grad, **kw).tokens)
