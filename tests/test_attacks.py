"""Attackers: the re-aimed score is the exact directional derivative of a trace's
log-likelihood, distill's per-epoch selection drops exactly what it says and resumes exactly,
and keep_correct / clean_mix pick the rows they promise."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import attacks, distill, gradients, models
from antidistill_jax.pytrees import flatten
from conftest import LLAMA, build_hf_checkpoint, random_examples

SMALL = distill.DistillConfig(lora_rank=None, learning_rate=1e-2, epochs=2, batch_size=4,
                              micro_batch_size=2, eval_every=2, checkpoint_every=1,
                              length_multiple=16, max_length=64, weight_decay=0.0)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
  path = tmp_path_factory.mktemp("attack_student")
  build_hf_checkpoint(path, tokenizer=tokenizer, seed=7, **LLAMA)
  return str(path)


def _loglik(model, examples) -> np.ndarray:
  ids, pad, loss = gradients.pack_examples(examples, len(examples), 64)
  nll, mask = gradients.token_nll(model, jnp.asarray(ids), jnp.asarray(pad), jnp.asarray(loss))
  return np.asarray(-jnp.sum(nll * mask, axis=1), np.float64)


def test_trace_scores_are_the_derivative_of_the_log_likelihood_along_g(student_dir):
  model = models.from_pretrained(student_dir)
  g, _ = gradients.proxy_gradient(model, random_examples(6, seed=3), micro_batch_size=3)
  train = random_examples(7, seed=4)
  scores = attacks.trace_scores(model, g, train, micro_batch_size=4)
  eps = 1e-3
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  moved = lambda sign: nnx.merge(graphdef, jax.tree.map(lambda p, d: p + sign * eps * d,
                                                        params, g), rest)
  fd = (_loglik(moved(1), train) - _loglik(moved(-1), train)) / (2 * eps)
  np.testing.assert_allclose(scores, fd, rtol=2e-2, atol=1e-3 * np.abs(fd).max())
  assert np.abs(scores).min() > 0  # not trivially zero


def _params(model):
  return {k: np.asarray(v) for k, v in flatten(nnx.state(model, nnx.Param)).items()}


def test_a_selection_that_keeps_everything_changes_nothing(student_dir, tmp_path):
  train, holdout = random_examples(8, seed=1), random_examples(3, seed=2)
  plain, plain_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                      str(tmp_path / "plain"), SMALL)
  calls = []
  keep_all = lambda model, epoch: calls.append(epoch) or np.ones(len(train), bool)
  kept, kept_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                    str(tmp_path / "kept"), SMALL, select=keep_all)
  assert calls == [0, 1]  # once per epoch
  assert kept_hist == plain_hist
  a, b = _params(plain), _params(kept)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_dropped_examples_teach_nothing(student_dir, tmp_path):
  """Dropping every example of epoch 1 leaves the weights where epoch 0 left them (no weight
  decay; AdamW's step is zero with zero gradients from the start), and dropping half trains on
  the other half only: the kept examples' loss falls more than the dropped ones'."""
  train, holdout = random_examples(8, seed=1), random_examples(3, seed=2)
  base = models.from_pretrained(student_dir)
  drop_all = lambda model, epoch: np.zeros(len(train), bool)
  untouched, hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                    str(tmp_path / "none"), SMALL, select=drop_all)
  a, b = _params(base), _params(untouched)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  assert all(r["train_loss"] == 0.0 for r in hist)  # no loss tokens counted
  half = np.arange(len(train)) < 4
  trained, _ = distill.distill(models.from_pretrained(student_dir), train, holdout,
                               str(tmp_path / "half"), dataclasses.replace(SMALL, epochs=4),
                               select=lambda model, epoch: half)
  before, after = _loglik(base, train), _loglik(trained, train)
  gain = after - before
  assert gain[half].mean() > 2 * max(gain[~half].mean(), 0.0) and gain[half].mean() > 0


def test_reaimed_selection_resumes_exactly(student_dir, tmp_path):
  """A run killed mid-epoch resumes with the mask it had (checkpointed), not a new one."""
  train, holdout, clean = (random_examples(10, seed=1), random_examples(3, seed=2),
                           random_examples(4, seed=6))
  config = dataclasses.replace(SMALL, epochs=3)
  logs = {}

  def run(name, max_steps=None):
    log = logs.setdefault(name, [])
    select = attacks.reaimed_selector(clean, train, drop_fraction=0.3, micro_batch_size=4,
                                      log=log)
    return distill.distill(models.from_pretrained(student_dir), train, holdout,
                           str(tmp_path / name), config, select=select, max_steps=max_steps)

  full, full_hist = run("full")
  run("cut", max_steps=4)  # 3 steps per epoch: killed in epoch 1, after its selection
  resumed, resumed_hist = run("cut")
  assert resumed_hist == full_hist
  a, b = _params(full), _params(resumed)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  assert [r["epoch"] for r in logs["full"]] == [0, 1, 2] and all(
      r["dropped"] == 3 for r in logs["full"])
  assert [r["epoch"] for r in logs["cut"]] == [0, 1, 2]  # epoch 1 was not recomputed on resume
  # The student moved between epochs, so its gradient and the scores moved too.
  assert logs["full"][0]["clean_loss"] != logs["full"][2]["clean_loss"]
  assert logs["full"][0]["score_dropped_mean"] > logs["full"][0]["score_kept_mean"]


def test_keep_correct_and_clean_mix_pick_their_rows():
  rows = [dict(index=i, correct=i % 3 == 0) for i in range(9)]
  assert [r["index"] for r in attacks.keep_correct(rows)] == [0, 3, 6]
  with pytest.raises(ValueError, match="graded"):
    attacks.keep_correct([dict(index=0)])
  clean = [dict(index=100 + i) for i in range(10)]
  mixed = attacks.clean_mix(rows, clean, 4, seed=0)
  assert mixed[:9] == rows and len(mixed) == 13
  extra = [r["index"] for r in mixed[9:]]
  assert len(set(extra)) == 4 and all(100 <= i < 110 for i in extra)
  assert mixed == attacks.clean_mix(rows, clean, 4, seed=0)  # seeded
  assert mixed != attacks.clean_mix(rows, clean, 4, seed=1)
  with pytest.raises(ValueError, match="clean set has 10"):
    attacks.clean_mix(rows, clean, 11)


def _mean_nll(model, examples) -> np.ndarray:
  """Each example's per-token mean completion NLL (the reference's l_i)."""
  ids, pad, loss = gradients.pack_examples(examples, len(examples), 64)
  nll, mask = gradients.token_nll(model, jnp.asarray(ids), jnp.asarray(pad), jnp.asarray(loss))
  return np.asarray(jnp.sum(nll * mask, axis=1) / jnp.sum(mask, axis=1), np.float64)


def test_reweighting_scores_are_the_reference_central_difference(student_dir):
  """a_i = [l_i(theta - e g_s) - l_i(theta + e g_s)] / 2e (strategic_fd's formula), g_s the
  student's gradient on the clean traces; w = exp(beta * clip(a)) / mean."""
  model = models.from_pretrained(student_dir)
  clean, train = random_examples(5, seed=3), random_examples(7, seed=4)
  g, _ = gradients.proxy_gradient(model, clean, micro_batch_size=4)
  eps = 1e-3
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  moved = lambda sign: nnx.merge(graphdef, jax.tree.map(lambda p, d: p + sign * eps * d,
                                                        params, g), rest)
  a = (_mean_nll(moved(-1), train) - _mean_nll(moved(1), train)) / (2 * eps)
  assert np.abs(a).min() > 0
  beta = 3.0 / np.abs(a).max()  # weights far from 1, none clipped
  w, stats = attacks.trace_weights(model, clean, train, beta=beta, clip=2 * np.abs(a).max(),
                                   micro_batch_size=4)
  expected = np.exp(beta * a) / np.exp(beta * a).mean()
  np.testing.assert_allclose(w, expected, rtol=3e-2)
  assert w.max() / w.min() > 5 and stats["clipped"] == 0
  # Clipping: a_i beyond +-clip count as +-clip.
  c = float(np.sort(np.abs(a))[3:5].mean())
  w, stats = attacks.trace_weights(model, clean, train, beta=beta, clip=c, micro_batch_size=4)
  expected = np.exp(beta * np.clip(a, -c, c))
  np.testing.assert_allclose(w, expected / expected.mean(), rtol=3e-2)
  assert stats["clipped"] == 3


def test_reweighting_at_beta_zero_is_passive_sft(student_dir, tmp_path):
  train, holdout, clean = (random_examples(8, seed=1), random_examples(3, seed=2),
                           random_examples(4, seed=6))
  w, stats = attacks.trace_weights(models.from_pretrained(student_dir), clean, train, beta=0.0,
                                   micro_batch_size=4)
  assert np.all(w == 1.0) and stats["a_sd"] > 0  # the scores exist; beta 0 ignores them
  plain, plain_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                      str(tmp_path / "plain"), SMALL)
  ones, ones_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                    str(tmp_path / "ones"), SMALL, weights=w)
  assert ones_hist == plain_hist
  a, b = _params(plain), _params(ones)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_weighted_sft_loss_is_the_weighted_token_sum_over_the_batch_tokens(student_dir,
                                                                          tmp_path):
  """Step 1's loss is sum_i w_i * (example i's summed NLL) / (the batch's completion tokens),
  and a weight of 0 is an example that teaches nothing."""
  train, holdout = random_examples(8, seed=1), random_examples(3, seed=2)
  weights = np.array([0.0, 3.0, 0.5, 1.0, 2.0, 0.0, 1.5, 0.25], np.float32)
  model = models.from_pretrained(student_dir)
  nll = distill.completion_nlls(model, train, SMALL, rows=SMALL.micro_batch_size)
  batch = distill.batch_indices(len(train), SMALL, 0)
  expected = (sum(weights[i] * nll[i].astype(np.float64).sum() for i in batch)
              / sum(len(nll[i]) for i in batch))
  _, hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                            str(tmp_path / "w"), SMALL, weights=weights, max_steps=1)
  np.testing.assert_allclose(hist[0]["train_loss"], expected, rtol=1e-5)
  zero = np.zeros(len(train), np.float32)
  untouched, hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                    str(tmp_path / "zero"), SMALL, weights=zero)
  a, b = _params(model), _params(untouched)
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  with pytest.raises(ValueError, match="one per training example"):
    distill.distill(models.from_pretrained(student_dir), train, holdout, str(tmp_path / "bad"),
                    SMALL, weights=weights[:3])


def test_attack_ids_parse_and_name_their_errors():
  assert attacks.parse("reaimed") == ("reaimed", None)
  assert attacks.parse("reweight@-0.5") == ("reweight", -0.5)
  for bad, message in (("nope", "unknown attack"), ("reaimed@1", "takes no argument"),
                       ("reweight@x", "not a number")):
    with pytest.raises(ValueError, match=message):
      attacks.parse(bad)


def test_reweight_mass_sets_the_weights_concentration_whatever_the_scores_scale():
  """reweight_mass: |beta| is solved so the most-weighted fifth holds the asked share; the
  weights then depend on the scores' order and shape, not their units (a fixed beta does)."""
  a = np.random.default_rng(0).normal(-8.0, 8.5, size=500)  # a tiny student's scale
  for mass in (0.22, 0.5, 0.9):
    beta = attacks.beta_for_mass(a, mass)
    w = np.exp(beta * a) / np.exp(beta * a).mean()
    assert abs(attacks.top_fifth_mass(w) - mass) < 1e-5 and beta > 0
    # The same scores in other units (the reference's 3B student: |a| ~ 0.2): same weights.
    small = attacks.beta_for_mass(a / 40.0, mass)
    np.testing.assert_allclose(small, 40.0 * beta, rtol=1e-4)
  # The sign picks which end is weighted up: the lowest scores under a negative sign, the
  # share reached on that end (skewed scores: the two ends need different |beta|).
  skewed = np.random.default_rng(1).exponential(size=500)
  neg, pos = attacks.beta_for_mass(skewed, 0.5, sign=-1.0), attacks.beta_for_mass(skewed, 0.5)
  w = np.exp(neg * (skewed - skewed.min()))
  assert neg < 0 and w[np.argmin(skewed)] == w.max() and abs(neg) > 1.5 * pos
  assert abs(attacks.top_fifth_mass(w) - 0.5) < 1e-5
  # A fixed beta is not: at the reference's 0.5, these scores put ~all weight on a fifth.
  w = np.exp(0.5 * np.clip(a, -10, 10))
  assert attacks.top_fifth_mass(w / w.mean()) > 0.85
  # The floor, share k/n, is beta 0 (every weight 1); below it, or with tied scores, an error.
  assert attacks.beta_for_mass(a, 0.2) == 0.0
  with pytest.raises(ValueError, match="below"):
    attacks.beta_for_mass(a, 0.1)
  with pytest.raises(ValueError, match="same score"):
    attacks.beta_for_mass(np.ones(10), 0.5)


def test_reweight_mass_at_the_uniform_share_is_passive_and_reaches_its_share(student_dir):
  from configs import base
  c = base.get_config().attacks
  s = attacks.settings("reweight_mass@0.3", c)
  assert s["top20_mass"] == 0.3 and s["sign"] == 1.0 and "beta" not in s
  assert attacks.settings("reweight_mass", c)["top20_mass"] == c.reweight.top20_mass
  with pytest.raises(ValueError, match=r"\[0.2, 1\)"):
    attacks.settings("reweight_mass@1.5", c)
  model = models.from_pretrained(student_dir)
  clean, train = random_examples(5, seed=3), random_examples(10, seed=4)
  w, stats = attacks.trace_weights(model, clean, train, beta=1.0, top20_mass=0.2,
                                   micro_batch_size=4)
  assert np.all(w == 1.0) and stats["beta"] == 0.0 and stats["a_sd"] > 0
  w, stats = attacks.trace_weights(model, clean, train, beta=1.0, top20_mass=0.6,
                                   micro_batch_size=4)
  assert abs(stats["top20_mass"] - 0.6) < 1e-5 and stats["clipped"] == 0 and stats["beta"] > 0
