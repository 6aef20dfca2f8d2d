"""The sampler without a proxy: HF greedy parity, EOS handling, sampling distribution, top-p/k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from antidistill_jax import filters, models, parallel, sampling
import conftest

ROWS = 384  # the checkpoints' table: these tests compare with HF and the full softmax


def generate(model, prompts, **kw):
  return conftest.generate(model, prompts, **dict(dict(vocab_size=ROWS), **kw))


@pytest.fixture(scope="module")
def teacher(hf_checkpoint):
  return models.from_pretrained(hf_checkpoint[0])


def test_greedy_equals_transformers_generate(hf_checkpoint, teacher, tokenizer):
  import torch
  _, ref = hf_checkpoint
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 320, n).tolist() for n in (5, 23, 11)]
  eos = [tokenizer.eos_token_id]
  out = generate(teacher, prompts, max_new_tokens=20, tau=0.0, eos_ids=eos)
  for p, ours in zip(prompts, out.tokens):
    hf = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                      max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert ours == hf[0, len(p):].tolist()


def test_eos_rows_stop_and_report_lengths(teacher):
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40]]
  free = generate(teacher, prompts, max_new_tokens=12, tau=0.0)
  assert list(free.lengths) == [12, 12, 12] and not free.finished.any()
  # Make the 4th greedy token of row 0 and the 2nd of row 1 end their rows.
  eos = (free.tokens[0][3], free.tokens[1][1])
  out = generate(teacher, prompts, max_new_tokens=12, tau=0.0, eos_ids=eos, pad_id=0)
  for row, ours in zip(free.tokens, out.tokens):
    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    assert ours == row[:cut]  # EOS included, nothing after it
  assert out.finished[0] and out.finished[1]
  assert out.lengths[0] <= 4 and out.lengths[1] <= 2
  assert [len(lp) for lp in out.logprobs] == list(out.lengths)


def test_teacher_logprobs_are_the_models_own(teacher):
  prompt = [3, 14, 15, 92, 65]
  out = generate(teacher, [prompt], max_new_tokens=6, tau=1.0, seed=1)
  seq = jnp.asarray([prompt + out.tokens[0]])
  logp = jax.nn.log_softmax(teacher(seq)[0], -1)
  expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens[0])]
  np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-4)


def test_sample_is_independent_of_batching(teacher):
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 320, n).tolist() for n in (4, 9, 6, 13, 2)]
  kw = dict(max_new_tokens=10, tau=1.0, top_p=0.9, seed=7)
  whole = generate(teacher, prompts, **kw)
  chunked = generate(teacher, prompts, batch_size=2, **kw)
  resumed = generate(teacher, prompts[3:], first_row=3, **kw)
  assert whole.tokens == chunked.tokens
  assert whole.tokens[3:] == resumed.tokens
  assert generate(teacher, prompts, **dict(kw, seed=8)).tokens != whole.tokens


def test_sharded_batch_equals_single_device(teacher):
  mesh = parallel.make_mesh(data=4, devices=jax.devices()[:4])
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, 320, n).tolist() for n in (4, 9, 6, 13, 2, 7)]
  kw = dict(max_new_tokens=8, tau=1.0, top_p=0.9, seed=3)  # the draw's redraw waves, sharded
  assert (generate(teacher, prompts, mesh=mesh, **kw).tokens
          == generate(teacher, prompts, **kw).tokens)


def _first_token_freqs(teacher, prompt, n, **kw):
  out = generate(teacher, [prompt] * n, max_new_tokens=1, seed=11, **kw)
  counts = np.bincount([t[0] for t in out.tokens], minlength=teacher.config.vocab_size)
  return counts / n


def _tv(p, q):
  return 0.5 * np.abs(p - q).sum()


def test_first_token_frequencies_match_the_distribution(teacher):
  prompt = [7, 8, 9, 10]
  z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1], np.float64)
  n = 4000
  softmax = lambda tau: np.exp(z / tau - np.max(z / tau)) / np.exp(z / tau - np.max(z / tau)).sum()
  for tau in (0.7, 1.5):
    expected = softmax(tau)
    freqs = _first_token_freqs(teacher, prompt, n, tau=tau)
    # The expected total variation of an n-sample empirical distribution: half the sum of
    # E|count/n - p| ~ sqrt(2 p (1 - p) / (pi n)) over tokens. Summed over hundreds of
    # tokens it varies little around that mean: 1.5x is far in its tail.
    mean_tv = 0.5 * np.sum(np.sqrt(2 * expected * (1 - expected) / (np.pi * n)))
    bound = 1.5 * mean_tv
    assert _tv(freqs, expected) < bound, tau
    assert _tv(freqs, softmax(1.0)) > bound, tau  # a sampler that ignored tau would fail


def test_top_p_removes_exactly_the_tail():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = np.isfinite(np.asarray(filters.filter_logits(logits, None, 0.8)))
  # 0.5 + 0.3 reaches 0.8: the third token is not needed.
  assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
  kept = np.isfinite(np.asarray(filters.filter_logits(logits, None, 0.81)))
  assert kept.tolist() == [[True, True, True, False], [False, True, True, True]]
  kept = np.isfinite(np.asarray(filters.filter_logits(logits, None, 0.3)))
  assert kept.sum(1).tolist() == [1, 1]  # the top token always survives
  kept = np.isfinite(np.asarray(filters.filter_logits(logits, 2, None)))
  assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_top_p_sampling_frequencies(teacher):
  prompt = [7, 8, 9, 10]
  z = np.asarray(teacher(jnp.asarray([prompt]))[0, -1], np.float64)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  keep = order[: np.searchsorted(np.cumsum(p[order]), 0.9) + 1]
  expected = np.zeros_like(p)
  expected[keep] = p[keep] / p[keep].sum()
  n = 4000
  freqs = _first_token_freqs(teacher, prompt, n, tau=1.0, top_p=0.9)
  assert freqs[np.setdiff1d(np.arange(len(p)), keep)].sum() == 0.0
  assert _tv(freqs, expected) < 1.5 * np.sqrt(len(keep) / n)


def test_bad_arguments_fail_clearly(teacher):
  with pytest.raises(ValueError, match="exceeds the teacher's max_position_embeddings"):
    generate(teacher, [[1] * 2000], max_new_tokens=100)
  with pytest.raises(ValueError, match="empty prompt"):
    generate(teacher, [[1], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="lam=1.0 needs a proxy and its gradient"):
    generate(teacher, [[1]], max_new_tokens=4, lam=1.0)
  with pytest.raises(ValueError, match="placement='logits'"):
    generate(teacher, [[1]], max_new_tokens=4, placement="logits")
  with pytest.raises(ValueError, match=r"prompts \[1\] hold token ids outside \[0, 384\)"):
    generate(teacher, [[1], [5, 384]], max_new_tokens=4)


def test_make_mesh_checks_the_device_count():
  with pytest.raises(ValueError, match="needs 6 devices, 8 given"):
    parallel.make_mesh(data=3, model=2)
  with pytest.raises(ValueError, match="do not split into model=3"):
    parallel.make_mesh(model=3)
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_generation_stops_once_every_row_finished(teacher):
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  free = generate(teacher, prompts, max_new_tokens=40, tau=0.0)
  assert free.decode_steps == 40
  eos = (free.tokens[0][2], free.tokens[1][4])  # both rows end within the first 8 steps
  kw = dict(max_new_tokens=40, tau=0.0, eos_ids=eos)
  for chunk in (1, 8, 13, 64):
    out = generate(teacher, prompts, scan_chunk=chunk, **kw)
    last = max(out.lengths)
    assert out.decode_steps == min(-(-last // chunk) * chunk, 40), chunk
    assert out.tokens == generate(teacher, prompts, scan_chunk=40, **kw).tokens
    assert out.finished.all()


def test_reference_params_reproduce_hf_generate_max_length(hf_checkpoint, teacher):
  """The authors' script calls HF generate with max_length=1024 on left-padded batches: the
  padded prompt counts, so a batch decodes max_length - (its longest prompt) tokens."""
  import torch
  _, ref = hf_checkpoint
  params = sampling.SamplingParams.reference(tau=1.0, max_length=20)
  assert (params.top_k, params.top_p, params.placement) == (50, 0.95, "reference")
  greedy = sampling.SamplingParams.reference(tau=0.0, max_length=20)
  assert (greedy.top_k, greedy.top_p) == (None, None)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 320, n).tolist() for n in (5, 9)]
  out = sampling.generate(teacher, prompts, greedy, vocab_size=384)
  assert list(out.lengths) == [11, 11]
  ids = torch.zeros((2, 9), dtype=torch.long)
  mask = torch.zeros((2, 9), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, 9 - len(p):], mask[i, 9 - len(p):] = torch.tensor(p), 1
  hf = ref.generate(ids, attention_mask=mask, max_length=20, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
  assert out.tokens == hf[:, 9:].tolist()
  # Alone in its batch, the short prompt gets 15 tokens, as HF gives it.
  alone = sampling.generate(teacher, prompts[:1], greedy, vocab_size=384)
  assert list(alone.lengths) == [15]
  sampled = sampling.generate(teacher, prompts, params, vocab_size=384)
  assert list(sampled.lengths) == [11, 11]
  with pytest.raises(ValueError, match="leaves no room under max_length=20"):
    sampling.generate(teacher, [[1] * 20], greedy, vocab_size=384)
