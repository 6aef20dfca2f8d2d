"""The proxy gradient g: correctness, micro-batching, sharding, storage and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import gradients, models, parallel, pytrees
from conftest import QWEN2, build_hf_checkpoint, random_examples


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


def test_a_gradient_that_is_not_finite_is_refused(proxy):
  graphdef, state = nnx.split(proxy)
  leaves, treedef = jax.tree.flatten(state)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)  # one NaN weight
  broken = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  with pytest.raises(FloatingPointError, match="not finite.*--config.models.dtype"):
    gradients.proxy_gradient(broken, random_examples(4, seed=1), micro_batch_size=4)


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


def _bf16_rounded(state):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state)


def test_gradient_of_a_bf16_proxy_is_computed_in_fp32(teacher_proxy_dirs):
  """g of a bf16 proxy is g of its bf16 weights upcast, with fp32 compute throughout (as the
  reference computes it): bf16 activations would move g by ~0.4%."""
  examples = random_examples(4, seed=6)
  proxy16 = models.from_pretrained(teacher_proxy_dirs[1], dtype=jnp.bfloat16)
  grad16, _ = gradients.proxy_gradient(proxy16, examples, micro_batch_size=4)
  assert jax.tree.structure(grad16) == jax.tree.structure(nnx.state(proxy16, nnx.Param))
  assert {x.dtype for x in jax.tree.leaves(grad16)} == {jnp.dtype(jnp.float32)}
  assert proxy16.dtype == jnp.bfloat16  # the proxy itself is left as it was
  # The same bf16 values in an fp32 model.
  proxy32 = models.from_pretrained(teacher_proxy_dirs[1])
  nnx.update(proxy32, _bf16_rounded(nnx.state(proxy32, nnx.Param)))
  for a, b in zip(jax.tree.leaves(nnx.state(proxy16, nnx.Param)),
                  jax.tree.leaves(nnx.state(proxy32, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
  grad32, _ = gradients.proxy_gradient(proxy32, examples, micro_batch_size=4)
  diff = float(gradients.global_norm(jax.tree.map(jnp.subtract, grad16, grad32)))
  assert diff <= 1e-5 * float(gradients.global_norm(grad32))


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


def test_save_load_roundtrip_tied_and_untied(hf_checkpoint, tmp_path):
  """Qwen2 (tied) and Llama (untied: the top-level lm_head leaf has no "/" in its name)."""
  proxy = models.from_pretrained(hf_checkpoint[0])
  grad, meta = gradients.proxy_gradient(proxy, random_examples(3), micro_batch_size=4)
  gradients.save_gradient(tmp_path / "g", grad, meta)
  loaded, _ = gradients.load_gradient(tmp_path / "g", proxy)
  assert jax.tree.structure(loaded) == jax.tree.structure(grad)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ("lm_head" in pytrees.flatten(loaded)) == (not proxy.config.tie_embeddings)


def test_flatten_plain_dicts_and_states():
  x, y = np.zeros(2), np.ones(3)
  assert pytrees.flatten({"lm_head": x, "layers/0/k": y}) == {"lm_head": x, "layers/0/k": y}
  assert pytrees.flatten({"layers": {0: {"k": y}}, "lm_head": x}) == {"layers/0/k": y, "lm_head": x}
  state = nnx.State({"lm_head": nnx.Param(x), "layers": {0: {"k": nnx.Param(y)}}})
  assert pytrees.flatten(state) == {"lm_head": x, "layers/0/k": y}
  back = pytrees.unflatten_like(state, {"lm_head": y, "layers/0/k": x})
  assert back["lm_head"].get_value() is y and back["layers"][0]["k"].get_value() is x


def test_fingerprint_follows_the_checkpoint_not_the_dtype(proxy, teacher_proxy_dirs, tmp_path):
  grad, meta = gradients.proxy_gradient(proxy, random_examples(2), micro_batch_size=2)
  gradients.save_gradient(tmp_path / "g", grad, meta)
  # The same checkpoint in bf16, and sharded over a mesh: the same proxy.
  proxy16 = models.from_pretrained(teacher_proxy_dirs[1], dtype=jnp.bfloat16)
  gradients.load_gradient(tmp_path / "g", proxy16)
  mesh = parallel.make_mesh(data=2, model=4)
  sharded = models.from_pretrained(teacher_proxy_dirs[1], mesh=mesh)
  assert (gradients.fingerprint(sharded) == gradients.fingerprint(proxy16)
          == meta["proxy_fingerprint"])


def _refused(path, model):
  with pytest.raises(ValueError, match="was computed for proxy"):
    gradients.load_gradient(path, model)
  gradients.load_gradient(path, model, check_fingerprint=False)


def test_fingerprint_refuses_other_weights(proxy, teacher_proxy_dirs, tokenizer, tmp_path):
  grad, meta = gradients.proxy_gradient(proxy, random_examples(2), micro_batch_size=2)
  gradients.save_gradient(tmp_path / "g", grad, meta)
  # Another checkpoint of the same architecture (another seed).
  build_hf_checkpoint(tmp_path / "other", tokenizer=tokenizer, seed=9, vocab_size=352,
                      **dict(QWEN2, hidden_size=32, intermediate_size=64))
  _refused(tmp_path / "g", models.from_pretrained(tmp_path / "other"))
  # One matrix with 1% relative noise.
  noisy = models.from_pretrained(teacher_proxy_dirs[1])
  kernel = noisy.layers[1].mlp.up_proj.kernel
  noise = jax.random.normal(jax.random.key(0), kernel.shape)
  kernel[...] = kernel[...] * (1 + 0.01 * noise)
  _refused(tmp_path / "g", noisy)
  # Two rows of one matrix swapped: the sum and the sum of squares do not change.
  swapped = models.from_pretrained(teacher_proxy_dirs[1])
  kernel = swapped.layers[0].self_attn.o_proj.kernel
  kernel[...] = kernel[...][jnp.array([1, 0] + list(range(2, kernel.shape[0])))]
  _refused(tmp_path / "g", swapped)
  # A norm scale 1% larger.
  scaled = models.from_pretrained(teacher_proxy_dirs[1])
  scaled.norm.scale[...] = scaled.norm.scale[...] * 1.01
  _refused(tmp_path / "g", scaled)


def test_fingerprint_of_a_gradient(proxy):
  grad, _ = gradients.proxy_gradient(proxy, random_examples(2), micro_batch_size=2)
  fp = pytrees.fingerprint(grad)
  assert fp == pytrees.fingerprint(pytrees.flatten(grad))  # a State or its flat dict
  assert fp != pytrees.fingerprint(jax.tree.map(lambda g: 2 * g, grad))
  assert fp != pytrees.fingerprint(grad, salt="other")


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
