"""Continuous batching: the same traces as static batching, whatever the slots, refill width,
scan chunk or mesh; slots turn over without recompiling."""

import jax
import numpy as np
import pytest

from antidistill_jax import sampling
from antidistill_jax.sampling import continuous
from conftest import QWEN2, VOCAB, build_hf_checkpoint, cache_copies, random_examples


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, rng.integers(2, 14)).tolist() for _ in range(n)]


def _sample(pair, prompts, params, eos=(), budgets=None, **kw):
  teacher, proxy, grad = pair
  sampler = sampling.Sampler(teacher, vocab_size=VOCAB, eos_ids=eos, proxy=proxy, grad=grad,
                             **kw)
  return sampler(prompts, params, budgets=budgets)


def _ragged_eos(pair, prompts, params):
  """An EOS id that ends rows at varied lengths: the random tiny teacher has no EOS habit, so
  take the id found in the most rows of an EOS-free run, up to two thirds of them (those rows
  then end at its first occurrence, the others run to the cap)."""
  out = _sample(pair, prompts, params)
  rows_with = {}
  for row in out.tokens:
    for t in set(row):
      rows_with[t] = rows_with.get(t, 0) + 1
  ranked = sorted((n, t) for t, n in rows_with.items() if n <= len(prompts) * 2 // 3)
  return (ranked[-1][1],)


@pytest.mark.parametrize("method", ["jvp", "fd", "poe"])
def test_continuous_batching_gives_the_static_traces(pair, method):
  prompts = _prompts(13)
  params = sampling.SamplingParams(max_new_tokens=40, tau=2.0, top_p=0.95,
                                   lam=0.6 if method == "poe" else 0.3, method=method, seed=7)
  eos = _ragged_eos(pair, prompts, params)
  static = _sample(pair, prompts, params, eos)
  lengths = static.lengths
  # The case continuous batching is for: rows ending at EOS at varied lengths, some at the cap.
  assert static.finished.sum() >= 4 and (~static.finished).sum() >= 2, lengths
  assert len(set(lengths.tolist())) >= 6, lengths
  cont = _sample(pair, prompts, params, eos, batching="continuous", batch_size=4, refill_rows=2,
                 scan_chunk=4)
  assert cont.tokens == static.tokens
  np.testing.assert_array_equal(cont.finished, static.finished)
  for a, b in zip(cont.logprobs, static.logprobs):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)  # float32 rounding


@pytest.fixture(scope="module")
def one_kv_head_pair(tmp_path_factory, tokenizer):
  """(teacher, proxy, g) with one KV head each (MQA): caches stored without their K axis."""
  from antidistill_jax import gradients, models
  root = tmp_path_factory.mktemp("mqa")
  mqa = dict(QWEN2, num_key_value_heads=1)
  build_hf_checkpoint(root / "teacher", tokenizer=tokenizer, seed=5, **mqa)
  build_hf_checkpoint(root / "proxy", tokenizer=tokenizer, seed=6, vocab_size=352,
                      **dict(mqa, hidden_size=32, intermediate_size=64))
  teacher, proxy = (models.from_pretrained(str(root / n)) for n in ("teacher", "proxy"))
  grad, _ = gradients.proxy_gradient(proxy, random_examples(8, seed=4), micro_batch_size=8)
  return teacher, proxy, grad


@pytest.mark.parametrize("case, method", [("one_kv_head", "jvp"), ("one_kv_head", "fd"),
                                          ("one_slot", "jvp")])
def test_continuous_batching_with_size_1_cache_axes(request, case, method):
  """The caches' size-1 axes are not stored (`models.cache`): one KV head leaves out K, one slot
  leaves out B, and each prompt still goes into its slot's rows (`Transformer.refill`) and
  decodes from its own cursor, giving static batching's traces."""
  pair = request.getfixturevalue("one_kv_head_pair" if case == "one_kv_head" else "pair")
  prompts = _prompts(5, seed=6)
  params = sampling.SamplingParams(max_new_tokens=16, tau=2.0, top_p=0.95, lam=0.3,
                                   method=method, seed=11)
  eos = _ragged_eos(pair, prompts, params)
  static = _sample(pair, prompts, params, eos)
  assert static.finished.any() and not static.finished.all()
  slots = 1 if case == "one_slot" else 2
  cont = _sample(pair, prompts, params, eos, batching="continuous", batch_size=slots,
                 refill_rows=1, scan_chunk=4)
  assert cont.tokens == static.tokens
  for a, b in zip(cont.logprobs, static.logprobs):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-5)  # float32 rounding


def test_continuous_program_at_one_slot_copies_no_cache(pair, monkeypatch):
  """One slot (batch 1, the cache stored without its B axis): no K/V cache or tangent cache is
  copied anywhere in the compiled continuous program, decode step or refill. The four-axis
  cache was copied at every step; a refill that scattered through the four-axis layout copied
  every cache at every refill."""
  programs = []
  run_program = continuous.run_program

  def compiled_too(*args, **kw):
    programs.append(run_program.lower(*args, **kw).compile().as_text())
    return run_program(*args, **kw)

  monkeypatch.setattr(continuous, "run_program", compiled_too)
  # Prompts padded to 16 slots, 40 new tokens (a multiple of the chunk): caches of 56 slots.
  params = sampling.SamplingParams(max_new_tokens=40, tau=1.0, lam=0.3, seed=1)
  _sample(pair, [[5] * 12] * 4, params, batching="continuous", batch_size=1, refill_rows=1,
          scan_chunk=4)
  # Caches of one row, checked down to the smaller model's (the proxy's) size.
  per_slot = min(m.config.num_kv_heads * m.config.head_dim for m in pair[:2])
  assert cache_copies(programs[0], 1, 56, per_slot) == []


@pytest.mark.slow
def test_slots_refill_width_chunk_and_mesh_do_not_change_the_traces(pair):
  """Fewer slots than prompts refilled one at a time with a one-step chunk, more slots than
  prompts, and slots split over a 2-device mesh: static batching's tokens every time. The slots
  turn over inside one compiled program: a call of many segments compiles it once."""
  prompts = _prompts(9, seed=1)
  params = sampling.SamplingParams(max_new_tokens=24, tau=1.5, top_p=0.9, lam=0.5, seed=3)
  eos = _ragged_eos(pair, prompts, params)
  static = _sample(pair, prompts, params, eos)
  assert static.finished.any() and not static.finished.all()
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  before = continuous.run_program._cache_size()
  for kw in (dict(batch_size=2, refill_rows=1, scan_chunk=1), dict(batch_size=16),
             dict(batch_size=4, refill_rows=3, scan_chunk=8, mesh=mesh)):
    cont = _sample(pair, prompts, params, eos, batching="continuous", **kw)
    assert cont.tokens == static.tokens, kw
    np.testing.assert_array_equal(cont.finished, static.finished)
    if kw.get("scan_chunk") == 1:  # 24 steps for each of 9 prompts on 2 slots: many segments
      assert continuous.run_program._cache_size() == before + 1
      assert cont.decode_steps > 3 * 8  # more than 3 segments of 8 one-step chunks


def test_greedy_and_plain_continuous_batching(pair):
  """tau = 0 (argmax: the same under any batching) and lam = 0 (no proxy side)."""
  prompts = _prompts(6, seed=2)
  for params in (sampling.SamplingParams(max_new_tokens=12, tau=0.0, lam=1.0),
                 sampling.SamplingParams(max_new_tokens=12, tau=1.0, seed=5)):
    static = _sample(pair, prompts, params, (7,))
    cont = _sample(pair, prompts, params, (7,), batching="continuous", batch_size=2,
                   scan_chunk=4)
    assert cont.tokens == static.tokens


def test_continuous_batching_raises_on_non_finite_logits(pair):
  with pytest.raises(FloatingPointError, match=r"continuous decode step 0 .*lam=1e\+38"):
    _sample(pair, _prompts(3), sampling.SamplingParams(max_new_tokens=4, lam=1e38),
            batching="continuous", batch_size=2)
  with pytest.raises(ValueError, match="batching='dynamic'"):
    _sample(pair, _prompts(3), sampling.SamplingParams(max_new_tokens=4), batching="dynamic")


def test_budgets_cap_each_prompt_under_both_batchings(pair):
  """Per-prompt caps (what bench/batching.py gives random models' traces): each trace is the
  uncapped trace cut at its cap, the same under static and continuous batching."""
  prompts = _prompts(7, seed=4)
  params = sampling.SamplingParams(max_new_tokens=20, tau=1.0, lam=0.5, seed=9)
  budgets = [0, 3, 20, 7, 1, 12, 30]
  full = _sample(pair, prompts, params)
  for kw in (dict(), dict(batch_size=3), dict(batching="continuous", batch_size=3, scan_chunk=4)):
    capped = _sample(pair, prompts, params, budgets=budgets, **kw)
    assert capped.tokens == [t[:b] for t, b in zip(full.tokens, budgets)], kw
  with pytest.raises(ValueError, match="one cap >= 0 per prompt"):
    _sample(pair, prompts, params, budgets=[3])
