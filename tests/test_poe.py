"""The product-of-experts defence (SamplingParams(method="poe")): the teacher's and the
unperturbed proxy's log-probs mixed as (1 - gamma) log p_T + gamma log p_P, then the temperature
and the filters. Pinned to its two ends (gamma = 0: temperature sampling; gamma = 1: the proxy
alone) and to the mixture's first-token distribution; it needs no g."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from antidistill_jax import sampling
from antidistill_jax.sampling import adjustment
from conftest import VOCAB, generate
from test_ads import _count_decode_compiles


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, rng.integers(2, 12)).tolist() for _ in range(n)]


def test_gamma_zero_is_temperature_sampling_token_for_token(pair):
  teacher, proxy, _ = pair
  prompts = _prompts(6)
  kw = dict(max_new_tokens=12, tau=1.3, top_p=0.9, seed=3)
  plain = generate(teacher, prompts, **kw)
  for gamma in (0.0, 1e-9):  # 0: the plain program; 1e-9: through the mixture, rounding to it
    out = generate(teacher, prompts, proxy=proxy, method="poe", lam=gamma, **kw)
    assert out.tokens == plain.tokens, gamma
  # The mixture's logits at gamma = 0 are temperature sampling's, bit for bit.
  z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 384)), jnp.float32)
  zp = jnp.asarray(np.random.default_rng(1).normal(size=(3, 384)), jnp.float32)
  mixed = adjustment.adjusted_logits(z, jax.nn.log_softmax(zp), lam=0.0, tau=0.7,
                                     placement="poe", greedy=False, vocab_size=VOCAB)
  plain_logits = adjustment.adjusted_logits(z, None, lam=0.0, tau=0.7, placement="paper",
                                            greedy=False, vocab_size=VOCAB)
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(plain_logits))


def test_gamma_one_decodes_as_the_proxy_alone(pair):
  """Greedy at gamma = 1 is the proxy's own greedy decoding, step after step: its cache, fed
  the chosen tokens, stays the proxy's (the teacher only steps alongside)."""
  teacher, proxy, _ = pair
  prompts = _prompts(5, seed=1)
  poe = generate(teacher, prompts, max_new_tokens=16, tau=0.0, proxy=proxy, method="poe",
                 lam=1.0)
  alone = generate(proxy, prompts, max_new_tokens=16, tau=0.0)
  assert poe.tokens == alone.tokens
  teacher_greedy = generate(teacher, prompts, max_new_tokens=16, tau=0.0)
  assert teacher_greedy.tokens != alone.tokens  # the two models do disagree


def test_first_token_frequencies_match_the_mixture(pair):
  teacher, proxy, _ = pair
  prompt, n, tau, gamma = [7, 8, 9, 10], 4000, 0.8, 0.6
  z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1], np.float64)[:VOCAB]
  zp = np.asarray(proxy(jnp.asarray([prompt]))[0, -1], np.float64)[:VOCAB]
  logp = lambda x: x - np.logaddexp.reduce(x)
  probs = lambda logits: np.exp(logits - np.logaddexp.reduce(logits))
  expected = probs(((1 - gamma) * logp(z) + gamma * logp(zp)) / tau)
  plain = probs(logp(z) / tau)
  out = generate(teacher, [prompt] * n, max_new_tokens=1, tau=tau, seed=5, proxy=proxy,
                 method="poe", lam=gamma)
  freqs = np.bincount([t[0] for t in out.tokens], minlength=VOCAB) / n
  tv = 0.5 * np.abs(freqs - expected).sum()
  bound = 1.5 * np.sqrt(np.sum(expected > 1e-4) / n)
  assert tv < bound
  assert 0.5 * np.abs(freqs - plain).sum() > 2 * bound  # the teacher alone would fail


def test_poe_needs_no_gradient_and_keeps_one_compile_per_sweep(pair):
  teacher, proxy, _ = pair
  sampler = sampling.Sampler(teacher, vocab_size=VOCAB, proxy=proxy)  # no g
  prompts = _prompts(4, seed=2)
  compiled = _count_decode_compiles()
  outs = [sampler(prompts, sampling.SamplingParams(max_new_tokens=6, tau=0.6, top_p=0.95,
                                                   method="poe", lam=gamma)).tokens
          for gamma in (0.3, 0.6, 0.9)]
  assert len(compiled) == 1, compiled  # gamma is traced: one program for the sweep
  assert len({str(o) for o in outs}) > 1
  with pytest.raises(ValueError, match="needs g, the proxy's gradient"):
    sampler(prompts, sampling.SamplingParams(max_new_tokens=6, lam=0.1, method="jvp"))


def test_bad_poe_settings_are_refused():
  with pytest.raises(ValueError, match=r"gamma .* must be in \[0, 1\]"):
    sampling.SamplingParams(max_new_tokens=4, method="poe", lam=1.5)
  with pytest.raises(ValueError, match="one form"):
    sampling.SamplingParams(max_new_tokens=4, method="poe", lam=0.5, placement="reference")
