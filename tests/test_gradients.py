"""The proxy gradient g: correctness, micro-batching, sharding, storage and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import gradients, models
from conftest import random_examples


@pytest.fixture(scope="module")
def proxy(teacher_proxy_dirs):
  return models.from_pretrained(teacher_proxy_dirs[1])


def _loss(model, examples):
  ids, pad, loss = gradients.pack_examples(examples, len(examples), 64)
  return float(jnp.mean(gradients.sequence_nll(model, jnp.asarray(ids), jnp.asarray(pad),
                                               jnp.asarray(loss))))


def test_sequence_nll_is_completion_only_mean(proxy):
  prompt, completion = [5, 6, 7, 8], [9, 10, 11]
  ids, pad, loss = gradients.pack_examples([(prompt, completion)], 1, 16)
  nll = float(gradients.sequence_nll(proxy, jnp.asarray(ids), jnp.asarray(pad), jnp.asarray(loss))[0])
  logp = np.asarray(jax.nn.log_softmax(proxy(jnp.asarray([prompt + completion]))[0], -1))
  expected = -np.mean([logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion)])
  np.testing.assert_allclose(nll, expected, rtol=1e-5)


def test_gradient_matches_finite_difference_of_the_loss(proxy):
  examples = random_examples(6, seed=1)
  grad, meta = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  np.testing.assert_allclose(meta["mean_loss"], _loss(proxy, examples), rtol=1e-5)
  assert meta["num_sequences"] == 6
  assert meta["num_completion_tokens"] == sum(len(c) for _, c in examples)
  graphdef, theta = nnx.split(proxy)
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  u = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  h = 1e-3
  shifted = lambda sign: nnx.merge(graphdef, jax.tree.map(lambda p, d: p + sign * h * d, theta, u))
  fd = (_loss(shifted(1), examples) - _loss(shifted(-1), examples)) / (2 * h)
  directional = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(u)))
  np.testing.assert_allclose(directional, fd, rtol=2e-2)


def test_micro_batched_and_sharded_equal_one_batch(proxy):
  examples = random_examples(7, seed=2)
  one, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=8)
  micro, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=2)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=4, mesh=mesh)
  for a, b, c in zip(jax.tree.leaves(one), jax.tree.leaves(micro), jax.tree.leaves(sharded)):
    a = np.asarray(a)
    # Summation order differs between layouts: compare at fp32 round-off of the leaf's scale.
    tol = 1e-5 * np.abs(a).max()
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(np.asarray(c), a, rtol=1e-4, atol=tol)


def test_gradient_is_fp32_for_a_bf16_proxy(teacher_proxy_dirs):
  proxy16 = models.from_pretrained(teacher_proxy_dirs[1], dtype=jnp.bfloat16)
  grad, _ = gradients.proxy_gradient(proxy16, random_examples(2), micro_batch_size=2)
  assert {x.dtype for x in jax.tree.leaves(grad)} == {jnp.dtype(jnp.float32)}


def test_save_load_roundtrip_and_validation(proxy, teacher_proxy_dirs, tmp_path):
  grad, meta = gradients.proxy_gradient(proxy, random_examples(3), micro_batch_size=4)
  gradients.save_gradient(tmp_path / "g", grad, meta)
  loaded, loaded_meta = gradients.load_gradient(tmp_path / "g", proxy)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(loaded) == jax.tree.structure(grad)
  assert {k: loaded_meta[k] for k in meta} == meta
  # A different proxy (the teacher) is refused, naming the mismatched leaves.
  teacher = models.from_pretrained(teacher_proxy_dirs[0])
  with pytest.raises(ValueError, match=r"mis-shaped leaves .*embed_tokens/embedding: gradient \(352, 32\) vs proxy \(384, 64\)"):
    gradients.load_gradient(tmp_path / "g", teacher)
  with pytest.raises(FileNotFoundError, match="no gradient checkpoint"):
    gradients.load_gradient(tmp_path / "nowhere", proxy)


def test_fingerprint_detects_other_weights(proxy, teacher_proxy_dirs, tmp_path):
  grad, meta = gradients.proxy_gradient(proxy, random_examples(2), micro_batch_size=2)
  gradients.save_gradient(tmp_path / "g", grad, meta)
  other = models.from_pretrained(teacher_proxy_dirs[1])
  other.norm.scale[...] = other.norm.scale[...] * 1.01
  with pytest.raises(ValueError, match="was computed for proxy"):
    gradients.load_gradient(tmp_path / "g", other)
  gradients.load_gradient(tmp_path / "g", other, check_fingerprint=False)


def test_mismatched_tree_names_leaves(proxy):
  grad, _ = gradients.proxy_gradient(proxy, random_examples(2), micro_batch_size=2)
  flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grad)}
  flat.pop("layers/1/mlp/up_proj/kernel")
  flat["layers/0/self_attn/q_norm/scale"] = np.zeros(8)
  with pytest.raises(ValueError, match=r"missing leaves \['layers/1/mlp/up_proj/kernel'\].*extra leaves \['layers/0/self_attn/q_norm/scale'\]"):
    gradients.check_compatible(proxy, flat)


def test_chunked_loss_equals_one_piece(proxy):
  examples = random_examples(3, seed=5)
  ids, pad, loss = (jnp.asarray(a) for a in gradients.pack_examples(examples, 3, 40))
  whole = gradients.token_nll(proxy, ids, pad, loss, chunk=None)[0]
  for chunk in (7, 16, 39):
    np.testing.assert_allclose(gradients.token_nll(proxy, ids, pad, loss, chunk=chunk)[0], whole,
                               rtol=1e-6, atol=1e-6)
  graphdef, theta = nnx.split(proxy)
  def total(p, chunk):
    return jnp.sum(gradients.token_nll(nnx.merge(graphdef, p), ids, pad, loss, chunk=chunk)[0])
  g_whole = jax.grad(total)(theta, None)
  g_chunk = jax.grad(total)(theta, 7)
  for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * np.abs(np.asarray(a)).max())
