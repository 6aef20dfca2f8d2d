"""Parity of the NNX models with the transformers/PyTorch reference, KV cache, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params
from jax.sharding import PartitionSpec

from antidistill_jax import models, parallel, sampling
from antidistill_jax.models import cache as cache_lib
from conftest import cache_copies, torch_logits


def rel_err(a, b) -> float:
  """Max abs error relative to the logit scale (max |b|)."""
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def left_pad(rows, pad_id=0):
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask


def test_config_reads_architecture(hf_checkpoint):
  path, ref = hf_checkpoint
  cfg = models.load_config(path)
  hf = ref.config
  hf_head_dim = getattr(hf, "head_dim", None)
  assert cfg.head_dim == (hf_head_dim if hf_head_dim else hf.hidden_size // hf.num_attention_heads)
  # And the weights agree: q_proj is [N * H, D] in HF layout.
  assert ref.model.layers[0].self_attn.q_proj.weight.shape[0] == cfg.num_heads * cfg.head_dim
  assert cfg.num_kv_heads == hf.num_key_value_heads < cfg.num_heads
  assert cfg.tie_embeddings == hf.tie_word_embeddings
  if cfg.model_type == "qwen2":
    assert cfg.qkv_bias and not cfg.o_bias and cfg.rope_scaling is None
  else:
    assert cfg.rope_scaling is not None and cfg.head_dim * cfg.num_heads != cfg.hidden_size
  # RoPE frequencies equal transformers' own (llama3 scaling included).
  np.testing.assert_allclose(cfg.inv_freq(), ref.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_logits_match_pytorch_on_long_prompt(hf_checkpoint):
  path, ref = hf_checkpoint
  model = models.from_pretrained(path)
  ids = np.random.default_rng(0).integers(0, 320, size=(2, 300))
  ours = model(jnp.asarray(ids))
  assert ours.shape == (2, 300, model.config.vocab_size) and ours.dtype == jnp.float32
  assert rel_err(ours, torch_logits(ref, ids)) <= 1e-4


def test_tied_embeddings_share_one_array(hf_checkpoint):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  if model.config.tie_embeddings:
    assert not hasattr(model, "lm_head")
    assert model.unembed_table() is model.embed_tokens.embedding[...]
  else:
    assert model.lm_head[...].shape == model.embed_tokens.embedding[...].shape


def test_left_padded_batch_equals_unpadded_rows(hf_checkpoint):
  path, ref = hf_checkpoint
  model = models.from_pretrained(path)
  rng = np.random.default_rng(1)
  rows = [rng.integers(0, 320, size=n) for n in (7, 33, 20)]
  ids, mask = left_pad(rows)
  padded = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  for i, row in enumerate(rows):
    expected = torch_logits(ref, row[None])[0]
    assert rel_err(padded[i, -len(row):], expected) <= 1e-4


def test_right_padding_gives_the_same_logits(hf_checkpoint):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  rows = [np.arange(5) + 3, np.arange(12) + 40]
  ids = np.zeros((2, 12), np.int32)
  mask = np.zeros((2, 12), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  padded = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  for i, r in enumerate(rows):
    alone = np.asarray(model(jnp.asarray(r[None])))[0]
    assert rel_err(padded[i, :len(r)], alone) <= 1e-5


def test_kv_cached_decode_equals_full_forward(hf_checkpoint):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  rng = np.random.default_rng(2)
  rows = [rng.integers(0, 320, size=n) for n in (9, 4, 15)]
  new = rng.integers(0, 320, size=(3, 6))
  ids, mask = left_pad(rows)
  prefill = jax.jit(lambda m, i, k: m.prefill(i, k, ids.shape[1] + new.shape[1]))
  decode = jax.jit(lambda m, tok, c: m.decode(tok, c))
  logits, cache = prefill(model, jnp.asarray(ids), jnp.asarray(mask))
  steps = [logits]
  for t in range(new.shape[1]):
    logits, cache = decode(model, jnp.asarray(new[:, t]), cache)
    steps.append(logits)
  cached = np.stack([np.asarray(s) for s in steps], axis=1)  # [B, 1 + new, V]
  assert int(cache.end) == ids.shape[1] + new.shape[1]
  for i, row in enumerate(rows):
    full = np.asarray(model(jnp.asarray(np.concatenate([row, new[i]])[None])))[0]
    assert rel_err(cached[i], full[len(row) - 1:]) <= 1e-5


def empty_cache(model, batch: int, max_len: int, squeeze: bool = False) -> models.KVCache:
  """A cache of `max_len` zero slots with nothing written (end = 0, no left padding): the
  state `model.step` starts a chunked prefill from. squeeze: stored without its size-1 (B, K)
  axes, as `prefill` stores it; else with all four."""
  cfg = model.config
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  squeezed = cache_lib.size_1_axes(batch, cfg.num_kv_heads) if squeeze else ()
  zeros = lambda: tuple(jnp.zeros([n for i, n in enumerate(shape) if i not in squeezed],
                                  model.dtype) for _ in range(cfg.num_layers))
  return models.KVCache(k=zeros(), v=zeros(), start_B=jnp.zeros((batch,), jnp.int32),
                        end=jnp.zeros((), jnp.int32), squeezed=squeezed)


@pytest.mark.parametrize("batch, squeeze", [(2, False), (2, True), (1, True)])
def test_chunked_prefill_through_step_equals_one_prefill(hf_checkpoint, batch, squeeze):
  """Several tokens a step into a cache with all four axes, or stored without its size-1
  (B, K) axes (one KV head: the llama fixture; batch 1)."""
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  ids = np.random.default_rng(3).integers(0, 320, size=(batch, 24))
  cache = empty_cache(model, batch, 32, squeeze)
  assert cache.k[0].ndim == 4 - len(cache.squeezed)
  first, cache = model.step(jnp.asarray(ids[:, :10]), cache)
  second, cache = model.step(jnp.asarray(ids[:, 10:]), cache)
  full = np.asarray(model(jnp.asarray(ids)))
  assert rel_err(np.concatenate([first, second], axis=1), full) <= 1e-5


def test_causality_future_positions_get_zero_gradient(hf_checkpoint):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  t = 12
  x_BTD = model.embed(jnp.arange(t)[None] + 5)
  positions = jnp.arange(t)[None]
  mask = jnp.tril(jnp.ones((t, t), bool))[None]

  def logit_sum_at(x, q):
    h, _ = model.hidden(x, positions, mask)
    return model.logits(h)[0, q].sum()

  for q in (0, 5, t - 1):
    grad = np.asarray(jax.grad(logit_sum_at)(x_BTD, q))[0]
    assert np.all(grad[q + 1:] == 0.0), f"position {q} depends on the future"
    assert np.all(np.abs(grad[: q + 1]).sum(-1) > 0), f"position {q} ignores its past"


def test_bf16_is_close_to_fp32(hf_checkpoint):
  path, ref = hf_checkpoint
  ids = np.random.default_rng(4).integers(0, 320, size=(1, 64))
  expected = torch_logits(ref, ids)
  bf16 = models.from_pretrained(path, dtype=jnp.bfloat16)
  assert bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16
  out = bf16(jnp.asarray(ids))
  assert out.dtype == jnp.float32  # logits are accumulated in fp32 whatever the compute dtype
  assert np.all(np.isfinite(out))
  assert rel_err(out, expected) < 5e-2
  # Same argmax on nearly all positions.
  assert np.mean(np.argmax(out, -1) == np.argmax(expected, -1)) > 0.9
  # fp32 storage with bf16 compute also runs.
  mixed = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert mixed.embed_tokens.embedding[...].dtype == jnp.float32
  assert rel_err(mixed(jnp.asarray(ids)), expected) < 5e-2


def test_unsupported_configs_fail_clearly():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)
  with pytest.raises(ValueError, match="model_type 'qwen3' is not supported"):
    models.config_from_hf(dict(base, model_type="qwen3"))
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    models.config_from_hf(dict(base, model_type="llama",
                               rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ValueError, match="sliding-window"):
    models.config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True))
  # Old-style top-level rope_theta and rope_scaling are read.
  cfg = models.config_from_hf(dict(
      base, model_type="llama", rope_theta=5e5,
      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling.factor == 32.0


def _avals(jaxpr):
  """Every variable's aval in a closed jaxpr, nested jaxprs (jit, custom_jvp...) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for sub in jaxprs_in_params(eqn.params):
      yield from _avals(sub)


def test_prefill_attends_over_the_prompt_only(hf_checkpoint):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  cfg = model.config
  b, p, s = 2, 16, 1024
  ids = jnp.ones((b, p), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda m, i: m.prefill(i, i, s))(model, ids)
  # The only S-sized values are the cache's [B, K, S, H] (the pad that fills it; one KV head:
  # [B, S, H]): no logits, mask or probabilities over S slots.
  cache_shape = tuple(n for n in (b, cfg.num_kv_heads, s, cfg.head_dim) if n != 1)
  s_sized = {a.shape for a in _avals(jaxpr.jaxpr) if s in getattr(a, "shape", ())}
  assert s_sized == {cache_shape}
  # And compiled scratch memory does not grow with the cache length.
  def temp_bytes(max_len):
    f = jax.jit(lambda m, i: m.prefill(i, i, max_len))
    return f.lower(model, ids).compile().memory_analysis().temp_size_in_bytes
  short, long = temp_bytes(64), temp_bytes(4096)
  assert long <= 1.1 * short + 4096, (short, long)


def test_prefill_decode_derivatives_are_finite_with_left_pads(hf_checkpoint):
  """Left-pad queries attend to nothing; their rows must not put NaN into values, jvp tangents
  (what the exact-JVP Delta carries through the cache) or gradients."""
  path, _ = hf_checkpoint
  graphdef, theta = nnx.split(models.from_pretrained(path))
  ids, mask = left_pad([np.arange(3) + 7, np.arange(11) + 1])
  token = jnp.asarray([5, 9])

  def run(state):
    model = nnx.merge(graphdef, state)
    z0, cache = model.prefill(jnp.asarray(ids), jnp.asarray(mask), ids.shape[1] + 2)
    z1, cache = model.decode(token, cache)
    return (z0, z1), (cache.k, cache.v)

  g = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape), x.dtype),
                   theta)
  primals, tangents = jax.jit(lambda st, d: jax.jvp(run, (st,), (d,)))(theta, g)
  grad = jax.jit(jax.grad(lambda st: sum(z.sum() for z in run(st)[0])))(theta)
  for tree in (primals, tangents, grad):
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))
  # The pad slots' keys do get (finite) tangents: they are computed, just never attended to.
  assert np.any(np.asarray(tangents[1][0][0])[0, :ids.shape[1] - 3] != 0)


@pytest.mark.parametrize("data, model_axis", [(4, 2), (2, 4)])
def test_sharded_model_gives_the_same_logits_and_pins_the_cache(hf_checkpoint, data, model_axis):
  path, _ = hf_checkpoint
  plain = models.from_pretrained(path)
  assert plain.mesh is None
  mesh = parallel.make_mesh(data=data, model=model_axis)
  sharded = models.shard_model(models.from_pretrained(path), mesh)
  assert sharded.mesh is mesh
  rng = np.random.default_rng(5)
  ids, mask = left_pad([rng.integers(0, 320, size=n) for n in (5, 12, 9, 2)])
  new = rng.integers(0, 320, size=(4, 3))

  def run(model, i, m):
    logits, cache = model.prefill(i, m, ids.shape[1] + new.shape[1])
    prefill_cache, steps = cache, [logits]
    for t in range(new.shape[1]):
      logits, cache = model.decode(jnp.asarray(new[:, t]), cache)
      steps.append(logits)
    return jnp.stack(steps, 1), prefill_cache, cache

  want = jax.jit(run)(plain, jnp.asarray(ids), jnp.asarray(mask))
  got = jax.jit(run)(sharded, *parallel.shard_batch((jnp.asarray(ids), jnp.asarray(mask)), mesh))
  # fp32 round-off of sums split across shards: it scales with the largest entry (the logits'
  # reached 1.15e-5 against 1.1e-5 allowed at an entry of 0.1 when atol was a flat 1e-5).
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    w, g = np.asarray(w), np.asarray(g)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))
  # Kv heads split over `model` only when it divides them (Qwen2: 2 heads; Llama: 1, an axis the
  # cache does not store, models.cache).
  k = sharded.config.num_kv_heads
  heads = ("model",) if k % model_axis == 0 else () if k == 1 else (None,)
  want_sharding = jax.sharding.NamedSharding(mesh, PartitionSpec("data", *heads, None, None))
  for cache in got[1:]:
    for x in cache.k + cache.v:
      assert x.sharding.is_equivalent_to(want_sharding, x.ndim), x.sharding
  # The sampler's fd path: one vmapped prefill over stacked parameter copies, on the mesh.
  graphdef, theta = nnx.split(sharded)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), theta)
  prefill = lambda st: nnx.merge(graphdef, st).prefill(jnp.asarray(ids), jnp.asarray(mask), 32)
  z_2BV, _ = jax.jit(jax.vmap(prefill))(stacked)
  np.testing.assert_allclose(np.asarray(z_2BV[1]), np.asarray(want[0][:, 0]), rtol=1e-5,
                             atol=1e-5)


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a jaxpr, nested jaxprs included."""
  return sum((eqn.primitive.name == primitive)
             + sum(_count(sub, primitive) for sub in jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_tangents_give_jax_jvp_reading_each_operand_once(hf_checkpoint, dtype):
  """models.stack_tangents (the exact-JVP Delta's proxy): the same values and tangents as
  jax.jvp through prefill and a cached decode step, with two products per bilinear map (the
  operand against the stacked primal and tangent, the primal against the operand's tangent)
  where jax.jvp has three."""
  path, _ = hf_checkpoint
  graphdef, theta = nnx.split(models.from_pretrained(path, dtype=dtype))
  cfg = nnx.merge(graphdef, theta).config
  ids, mask = left_pad([np.arange(3) + 7, np.arange(11) + 1])
  rng = np.random.default_rng(0)
  g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), theta)

  def run(state, stacked):
    model = nnx.merge(graphdef, state)
    if stacked:
      models.stack_tangents(model)
    z0, cache = model.prefill(jnp.asarray(ids), jnp.asarray(mask), ids.shape[1] + 2)
    z1, cache = model.decode(jnp.asarray([5, 9]), cache)
    return (z0, z1), (cache.k, cache.v)

  def jvp(stacked):
    return lambda st, d: jax.jvp(lambda s: run(s, stacked), (st,), (d,))

  plain, stacked = (jax.jit(jvp(s))(theta, g) for s in (False, True))
  tol = 1e-5 if dtype == jnp.float32 else 8e-3  # round-off (bf16: 2 ulps) of the largest entry
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(stacked)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=tol * np.abs(a).max())
  # Per layer 7 projections + 2 attention products, 2 dots each; the unembedding keeps jax's 3
  # (its primal logits are dropped by XLA where unused); one prefill and one decode step.
  dots = {s: _count(jax.make_jaxpr(jvp(s))(theta, g).jaxpr, "dot_general") for s in (False, True)}
  assert dots[True] == 2 * (cfg.num_layers * 9 * 2 + 3), dots
  assert dots[False] > dots[True], dots


def _decoding_cache_copies(path: str, method: str, b: int) -> list[str]:
  """The cache-sized copies in the compiled decode program of `method` at batch b."""
  model = models.from_pretrained(path)
  cfg = model.config
  rng = np.random.default_rng(0)
  grad = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                      nnx.state(model, nnx.Param))
  ads = {} if method == "plain" else dict(proxy=model, grad=grad)
  # One scan chunk of 53 steps: the caches have exactly prompt + 53 slots, a length no other
  # dimension of this model has.
  sampler = sampling.Sampler(model, vocab_size=cfg.vocab_size, scan_chunk=53, **ads)
  params = sampling.SamplingParams(max_new_tokens=53, tau=1.0, top_p=0.9,
                                   lam=0.0 if method == "plain" else 1.0,
                                   method="jvp" if method == "plain" else method)
  batch = sampler.batch_inputs([[1] * 8] * b, b, seed=0)
  hlo = sampler.lower(batch, params).compile().as_text()
  slots = batch[0].shape[1] + 53
  return cache_copies(hlo, b, slots, cfg.num_kv_heads * cfg.head_dim)


@pytest.mark.parametrize("hf_checkpoint", ["qwen2"], indirect=True)
@pytest.mark.parametrize("method", ["plain", "fd", "jvp"])
def test_decoding_never_copies_a_cache(hf_checkpoint, method):
  """The cache's [B, K, S, H] layout is the one the attention products read, so the compiled
  decode program (plain, fd and the exact JVP's stacked products) makes no permuted copy of a
  K or V cache: with [B, S, K, H] XLA copied each layer's K and V caches into [B, K, ...]
  order at every step, two more reads and writes of the whole cache per step."""
  assert _decoding_cache_copies(hf_checkpoint[0], method, b=3) == []


@pytest.mark.parametrize("hf_checkpoint,b", [("llama", 3), ("qwen2", 1)],
                         ids=["one_kv_head", "batch_1"], indirect=["hf_checkpoint"])
@pytest.mark.parametrize("method", ["plain", "fd", "jvp"])
def test_decoding_copies_no_cache_with_a_size_1_axis(hf_checkpoint, b, method):
  """One KV head (the llama fixture) or batch 1: the same no-copy property as above. A cache
  that kept its size-1 axis was copied four times a step (XLA:CPU fused the slot update with
  the reshape that dropped the axis for the attention product); `models.cache` stores the
  arrays without it."""
  assert _decoding_cache_copies(hf_checkpoint[0], method, b=b) == []
