"""Antidistillation sampling: Delta exactness (fd and jvp), cached vs recomputed Delta,
lam=0 identity, sampling distributions for both placements, NaN guard, sharding."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import gradients, models, parallel, sampling
from antidistill_jax.sampling import adjustment
from conftest import VOCAB, generate, random_examples


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
  eps = 1e-2
  graphdef, theta = nnx.split(proxy)
  if method == "fd":
    plus, minus = sampling.perturbed_states(theta, grad, eps)
    state = (jax.tree.map(lambda a, b: jnp.stack([a, b]), plus, minus), eps)
  else:
    state = (theta, grad)
  proxies = adjustment._Proxies(graphdef, method, fd_stacked=True)
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
  full = np.asarray(sampling.delta(proxy, grad, p_ids, eps=eps, method=method,
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
  plain = generate(teacher, prompts, **kw)
  with_proxy = generate(teacher, prompts, proxy=proxy, grad=grad, lam=0.0, **kw)
  assert with_proxy.tokens == plain.tokens


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_ads_perturbs_and_stays_in_the_shared_vocab(pair, method):
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=16, tau=1.0, seed=4)
  plain = generate(teacher, prompts, **kw)
  ads = generate(teacher, prompts, proxy=proxy, grad=grad, lam=3.0, method=method, **kw)
  assert ads.tokens != plain.tokens
  assert max(max(t) for t in ads.tokens) < VOCAB  # tokenizer 320 < proxy 352 < teacher 384 rows


@pytest.mark.parametrize("delta_on", ["vocab", "nucleus"])
def test_vanishing_lam_is_plain_sampling_wherever_delta_applies(pair, delta_on):
  """lam = 1e-30 runs the proxy program (a lam of 0 would compile the plain one) and moves
  no logit: both placements of Delta must then sample plain sampling's tokens."""
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=16, tau=1.0, top_p=0.6, seed=4)
  plain = generate(teacher, prompts, **kw)
  ads = generate(teacher, prompts, proxy=proxy, grad=grad, lam=1e-30, delta_on=delta_on, **kw)
  assert ads.tokens == plain.tokens


def _outside_teacher_top_p(teacher, prompts, tokens, top_p):
  """Count of sampled tokens outside the teacher's own top-p set (tau 1) at their step."""
  from antidistill_jax import filters
  outside = 0
  for prompt, new in zip(prompts, tokens):
    ids = jnp.asarray([prompt + new])
    logits_TV = teacher(ids)[0, len(prompt) - 1:-1].astype(jnp.float32)
    logits_TV = jnp.where(jnp.arange(logits_TV.shape[-1]) < VOCAB, logits_TV, -jnp.inf)
    kept_TV = filters.filter_logits_sorted(logits_TV, None, top_p)
    outside += int(jnp.sum(~jnp.isfinite(kept_TV[jnp.arange(len(new)), jnp.asarray(new)])))
  return outside


def test_delta_on_the_nucleus_samples_only_the_teachers_top_p_set(pair):
  """delta_on="nucleus": every token lies in the teacher's own top-p set, and Delta still
  changes which; the authors' placement at the same lam lifts tokens from outside it."""
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41], [7, 8, 9, 10]]
  kw = dict(max_new_tokens=16, tau=1.0, top_p=0.5, seed=4, proxy=proxy, grad=grad, lam=6.0)
  nucleus = generate(teacher, prompts, delta_on="nucleus", **kw)
  vocab = generate(teacher, prompts, delta_on="vocab", **kw)
  plain = generate(teacher, prompts, max_new_tokens=16, tau=1.0, top_p=0.5, seed=4)
  assert _outside_teacher_top_p(teacher, prompts, nucleus.tokens, 0.5) == 0
  assert _outside_teacher_top_p(teacher, prompts, vocab.tokens, 0.5) > 0
  assert nucleus.tokens != plain.tokens


def test_delta_on_the_nucleus_needs_a_filter():
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingParams(max_new_tokens=4, tau=1.0, lam=1.0, delta_on="nucleus")
  sampling.SamplingParams(max_new_tokens=4, tau=0.0, lam=1.0, delta_on="nucleus")  # greedy


def _expected_first_token(teacher, proxy, grad, prompt, *, tau, lam, eps, placement):
  z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1], np.float64)
  d = np.asarray(sampling.delta(proxy, grad, jnp.asarray([prompt]), eps=eps), np.float64)[0]
  d = np.pad(d, (0, len(z) - len(d)))
  logp = z - np.logaddexp.reduce(z)
  logits = logp / tau + lam * d if placement == "paper" else (z + lam * d) / tau
  logits[VOCAB:] = -np.inf
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
  out = generate(teacher, [prompt] * n, max_new_tokens=1, tau=tau, seed=5, proxy=proxy,
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
  out = generate(teacher, prompts, max_new_tokens=1, tau=0.0, proxy=proxy, grad=grad,
                          lam=5.0, eps=1e-2)
  for prompt, tokens in zip(prompts, out.tokens):
    z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1])
    d = np.asarray(sampling.delta(proxy, grad, jnp.asarray([prompt])))[0]
    logp = z[:VOCAB] - np.logaddexp.reduce(z)
    assert tokens[0] == int(np.argmax(logp + 5.0 * d[:VOCAB]))


def test_non_finite_logits_raise_with_the_settings(pair):
  teacher, proxy, grad = pair
  with pytest.raises(FloatingPointError, match=r"step 0 .*float32, lam=1e\+38, eps=0.01.* "
                     r"--config.sample.method, --config.sample.eps, --config.models.dtype"):
    generate(teacher, [[5, 6, 7]], max_new_tokens=4, proxy=proxy, grad=grad, lam=1e38)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan), grad)
  with pytest.raises(FloatingPointError, match="non-finite sampling logits"):
    generate(teacher, [[5, 6, 7]], max_new_tokens=4, proxy=proxy, grad=bad, lam=1.0)


def test_sharded_ads_equals_single_device(pair):
  teacher, proxy, grad = pair
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=8, tau=1.0, seed=2, proxy=proxy, grad=grad, lam=2.0)
  assert (generate(teacher, prompts, mesh=mesh, **kw).tokens
          == generate(teacher, prompts, **kw).tokens)


def test_mismatched_gradient_is_refused_by_the_sampler(pair):
  teacher, proxy, grad = pair
  with pytest.raises(ValueError, match="gradient does not match the proxy's parameters"):
    generate(teacher, [[5]], max_new_tokens=2, proxy=teacher, grad=grad, lam=1.0)


def test_fd_as_two_calls_equals_the_stacked_call(pair):
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  kw = dict(max_new_tokens=10, tau=1.0, seed=9, proxy=proxy, grad=grad, lam=3.0, method="fd")
  assert (generate(teacher, prompts, fd_stacked=False, **kw).tokens
          == generate(teacher, prompts, **kw).tokens)


def test_lam_zero_compiles_no_proxy_work(pair):
  teacher, proxy, grad = pair
  plain = sampling.Sampler(teacher, vocab_size=VOCAB)
  with_proxy = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy, grad=grad)
  batch = plain.batch_inputs([[5, 6, 7]], rows=1, seed=0)
  params = sampling.SamplingParams(max_new_tokens=4)
  hlo = lambda sampler, **kw: sampler.lower(batch, dataclasses.replace(params, **kw)).as_text()
  assert with_proxy.proxy_state(params) is None
  assert hlo(with_proxy, lam=0.0) == hlo(plain)
  assert hlo(with_proxy, lam=1.0) != hlo(plain)


def _count_decode_compiles():
  """A list that grows by one for each XLA compilation of the decode program."""
  compiled = []

  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and "_decode_program" in str(
        kw.get("fun_name", "")):
      compiled.append(kw["fun_name"])

  jax.monitoring.register_event_duration_secs_listener(listener)
  return compiled


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_a_sweep_compiles_the_decode_program_once(pair, method):
  teacher, proxy, grad = pair
  sampler = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy, grad=grad)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  # A shape no other test uses, so the jit cache starts cold for it.
  base = sampling.SamplingParams(max_new_tokens=7, top_p=0.95, method=method, seed=1)
  compiled = _count_decode_compiles()
  outs = {}
  for tau in (0.8, 1.3):
    for lam in (0.5, 2.0, 4.0):
      for eps in ((1e-2, 3e-2) if method == "fd" else (1e-2,)):
        p = dataclasses.replace(base, tau=tau, lam=lam, eps=eps)
        outs[tau, lam, eps] = sampler(prompts, p).tokens
  nucleus = sampler(prompts, dataclasses.replace(base, tau=1.3, lam=4.0, delta_on="nucleus"))
  assert len(compiled) == 1, compiled
  assert len({str(v) for v in outs.values()}) > 1  # the settings did reach the program
  assert nucleus.tokens != outs[1.3, 4.0, 1e-2]
  # Traced settings give the samples of a fresh program built for each setting alone.
  p = dataclasses.replace(base, tau=1.3, lam=4.0, eps=1e-2)
  fresh = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy, grad=grad)
  assert fresh(prompts, p).tokens == outs[1.3, 4.0, 1e-2]


def _holdout_loss(proxy, state, examples):
  graphdef, _ = nnx.split(proxy)
  ids, pad, loss = gradients.pack_examples(examples, len(examples), 32)
  nll = gradients.sequence_nll(nnx.merge(graphdef, state), jnp.asarray(ids), jnp.asarray(pad),
                               jnp.asarray(loss))
  return float(jnp.mean(nll))


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_training_on_the_highest_delta_token_raises_the_holdout_loss(pair, method):
  """The direction of Delta: one SGD step of the proxy on the token Delta ranks highest raises
  its distillation loss l (the loss g is the gradient of), and on the lowest lowers it, by
  about lr * Delta. A flipped sign, a stale g or a wrong eps scale fails here."""
  _, proxy, grad = pair
  holdout = random_examples(8, seed=4)  # the examples g was computed on (fixture `pair`)
  prefix = jnp.asarray([[5, 17, 40, 2, 99, 7]])
  d = np.asarray(sampling.delta(proxy, grad, prefix, method=method, eps=1e-3))[0, :VOCAB]
  graphdef, theta = nnx.split(proxy)
  base = _holdout_loss(proxy, theta, holdout)
  lr = 1e-3

  def after_step_on(token):
    logp = lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p)(prefix)[0, -1])[token]
    step = jax.grad(logp)(theta)  # SGD on -log p(token) moves theta along +grad log p
    return _holdout_loss(proxy, jax.tree.map(lambda p, s: p + lr * s, theta, step), holdout)

  top, bottom = int(np.argmax(d)), int(np.argmin(d))
  up, down = after_step_on(top) - base, after_step_on(bottom) - base
  assert up > 0 > down
  # First order: the change is lr * Delta (Delta uses logits: up to a per-row constant).
  np.testing.assert_allclose(up - down, lr * (d[top] - d[bottom]), rtol=0.05)


@pytest.fixture(scope="module")
def bf16_pair(teacher_proxy_dirs):
  """The proxy in bfloat16, g from its fp32 twin, and the fp32 exact Delta to compare with."""
  proxy32 = models.from_pretrained(teacher_proxy_dirs[1])
  proxy16 = models.from_pretrained(teacher_proxy_dirs[1], dtype=jnp.bfloat16)
  grad, _ = gradients.proxy_gradient(proxy32, random_examples(8, seed=4), micro_batch_size=8)
  ids = jnp.asarray([[5, 17, 40, 2, 99, 7], [8, 8, 120, 33, 4, 61]])
  exact = np.asarray(sampling.delta(proxy32, grad, ids, method="jvp"))
  return proxy16, grad, ids, exact


def test_bf16_proxy_default_delta_is_exact(bf16_pair):
  proxy16, grad, ids, exact = bf16_pair
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the default must not need a warning
    got = sampling.delta(proxy16, grad, ids)
  assert np.all(_centered_cosine(got, exact) >= 0.99)
  assert np.all(_centered_cosine(sampling.delta(proxy16, grad, ids, method="jvp"), exact) >= 0.99)


def test_bf16_fd_that_rounds_away_warns(bf16_pair):
  proxy16, grad, ids, exact = bf16_pair
  with pytest.warns(RuntimeWarning, match=r"did not move under theta \+ eps\*g.*method='jvp'"):
    noisy = sampling.delta(proxy16, grad, ids, method="fd", eps=1e-4)
  assert np.all(_centered_cosine(noisy, exact) < 0.9)  # what the warning is about
  with warnings.catch_warnings():  # an eps large enough for bf16 passes without a warning
    warnings.simplefilter("error")
    coarse = sampling.delta(proxy16, grad, ids, method="fd", eps=0.3)
  assert np.all(_centered_cosine(coarse, exact) >= 0.95)


def test_bf16_sampler_default_matches_fp32_and_fd_warns(pair, bf16_pair):
  teacher, _, _ = pair
  proxy16, grad, _, _ = bf16_pair
  sampler = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy16, grad=grad)
  params = sampling.SamplingParams(max_new_tokens=3, tau=0.0, lam=5.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sampler([[7, 8, 9, 10]], params)
  with pytest.warns(RuntimeWarning, match="bfloat16 proxy at eps=0.0001"):
    sampler([[7, 8, 9, 10]], dataclasses.replace(params, method="fd", eps=1e-4))


def test_sampler_never_emits_padding_rows(pair, tokenizer):
  teacher, proxy, grad = pair
  with pytest.raises(ValueError, match="needs the tokenizer"):
    sampling.Sampler(teacher)
  # The teacher's table has 384 rows, the tokenizer 320 tokens: a flat distribution would put
  # ~17% of the samples on padding rows if they were not masked.
  flat = sampling.SamplingParams(max_new_tokens=16, tau=50.0, seed=3)
  runs = ((sampling.Sampler(teacher, tokenizer), 0.0),
          (sampling.Sampler(teacher, tokenizer, proxy=proxy, grad=grad), 2.0))
  for sampler, lam in runs:
    out = sampler([[5, 6, 7]] * 16, dataclasses.replace(flat, lam=lam))
    assert sum(map(len, out.tokens)) > 100
    assert max(max(t) for t in out.tokens) < len(tokenizer)
  out = sampling.generate(teacher, [[5, 6, 7]] * 16, flat, tokenizer)  # the one-shot form
  assert max(max(t) for t in out.tokens) < len(tokenizer)


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
  assert (generate(teacher_tp, prompts, proxy=proxy_tp, grad=grad_tp, mesh=mesh, **kw).tokens
          == generate(teacher, prompts, proxy=proxy, grad=grad, **kw).tokens)


def test_lam_calibrated_to_a_logprob_drop_reproduces_it_in_one_compile(pair):
  """sampling.calibration: the lam found for a target drop of the teacher's mean log-prob per
  token gives that drop (within the search's tolerance) when sampled again with the same seeds;
  lam is traced, so however many lams it tries the search compiles two decode programs (plain,
  which skips the proxy, and ADS); a collapse warns."""
  from antidistill_jax.sampling import calibration
  teacher, proxy, grad = pair
  sampler = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy, grad=grad)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41], [7, 8]]
  params = sampling.SamplingParams(max_new_tokens=9, tau=1.0, seed=3)  # a shape of its own
  compiled = _count_decode_compiles()
  lam, ladder = calibration.lam_for_logprob_drop(sampler, prompts, params, 0.5)
  assert len(compiled) == 2 and len(ladder) >= 3
  drop = calibration.logprob_drop(sampler, prompts, params, lam)
  assert drop == pytest.approx(dict(ladder)[lam])  # same seeds: the same text again
  assert abs(drop - 0.5) == min(abs(d - 0.5) for _, d in ladder)  # the closest lam measured
  # the target is bracketed: a tiny model's drop jumps as whole tokens change, so the search
  # ends between two measured lams on either side of it (a real model's drop is smoother)
  below = max(x for x, d in ladder if d < 0.5)
  above = min(x for x, d in ladder if d >= 0.5)
  assert below < above and above / below < 1.02
  with pytest.warns(RuntimeWarning, match="collapsed.*Lower --knob"):
    calibration.warn_if_collapsed(calibration.COLLAPSE_DROP + 1, lam, "--knob")
  with pytest.raises(ValueError, match="positive"):
    calibration.lam_for_logprob_drop(sampler, prompts, params, 0.0)


def test_stacked_and_plain_jvp_rules_sample_the_same_tokens(pair):
  """Sampler(jvp_stacked=False) (jax.jvp's own rule, bench/sampling.py's jvp_plain) and the
  default stacked rule compute the same Delta: the same traces."""
  teacher, proxy, grad = pair
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
  kw = dict(max_new_tokens=16, tau=1.0, top_p=0.95, seed=6, proxy=proxy, grad=grad, lam=2.0)
  stacked = generate(teacher, prompts, **kw)
  plain_rule = generate(teacher, prompts, jvp_stacked=False, **kw)
  assert plain_rule.tokens == stacked.tokens
