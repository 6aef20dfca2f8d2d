"""The Sampler: antidistillation sampling of a teacher as one call per setting.

  sampler = Sampler(teacher, tokenizer, proxy=proxy, grad=g)          # once per run
  out = sampler(prompts, SamplingParams(max_new_tokens=1024, tau=0.9, top_p=0.95, lam=0.08))

`SamplingParams` is the settings object; `Sampler` keeps the split models, the proxy side
prepared for the last (method, eps) (`adjustment`), places left-padded batches on the mesh with
one random key per prompt, runs the decode program (`decode`) and returns a `Generation`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import gradients, parallel
from antidistill_jax import tokenizer as tok_lib
from antidistill_jax.models.transformer import Transformer
from antidistill_jax.sampling.adjustment import (ADS_METHODS, METHODS, PLACEMENTS, _prepare_fd,
                                                 _prepare_jvp, warn_if_fd_rounds_away)
from antidistill_jax.sampling import continuous
from antidistill_jax.sampling.decode import Knobs, _decode_program, _Static, left_pad

DELTA_ON = ("vocab", "nucleus")
BATCHING = ("static", "continuous")
# Chunks per call of the continuous program: the host logs progress between calls.
_SEGMENT_CHUNKS = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample: the one settings object of `Sampler`, `traces` and the pipeline.

  max_new_tokens: decode steps at most (a compile-time shape).
  tau: temperature; 0 is greedy. lam: weight of Delta (0: plain sampling, no proxy work).
  eps: finite-difference step (method="fd" only). method: "jvp" (exact) or "fd"; or "poe",
    the product-of-experts defence instead of ADS: the teacher's and the proxy's log-probs
    mixed as (1 - lam) log p_T + lam log p_P, then tau and the filters (lam = gamma in [0, 1];
    no g; `adjustment`).
  placement: "paper" or "reference" (`adjustment`; "poe" has its one form).
  top_p, top_k: nucleus / top-k filters (None: off).
  delta_on: where lam * Delta applies. "vocab" (the authors'): on every token, then top-k/top-p
    of the adjusted logits, so Delta can lift tokens the teacher gives almost no mass into the
    nucleus. "nucleus": top-k/top-p of the teacher's own logits (tempered, no Delta), then
    lam * Delta reweights inside that set only; it needs top_p or top_k when sampling. Traced:
    both share a compiled program; at lam = 0 both are plain sampling.
  max_length: cap on the LEFT-PADDED prompt plus new tokens, as Hugging Face `generate`'s
    max_length counts it (the authors' script: 1024); a batch then decodes at most
    max_length - (its longest prompt) tokens. None: max_new_tokens for every batch.
  seed: randomness (per global prompt index, see `decode`).
  """
  max_new_tokens: int
  tau: float = 1.0
  lam: float = 0.0
  eps: float = 1e-2
  method: str = "jvp"
  placement: str = "paper"
  top_p: float | None = None
  top_k: int | None = None
  max_length: int | None = None
  seed: int = 0
  delta_on: str = "vocab"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; expected one of {METHODS}.")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"placement={self.placement!r}; expected one of {PLACEMENTS}.")
    if self.delta_on not in DELTA_ON:
      raise ValueError(f"delta_on={self.delta_on!r}; expected one of {DELTA_ON}.")
    if (self.delta_on == "nucleus" and self.tau > 0 and self.top_p is None
        and self.top_k is None):
      raise ValueError("delta_on='nucleus' restricts Delta to the teacher's top-p/top-k set, "
                       "and neither filter is on: set top_p (e.g. 0.95) or top_k, or use "
                       "delta_on='vocab'.")
    if self.tau < 0:
      raise ValueError(f"tau={self.tau} must be >= 0 (0 is greedy).")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k} must be >= 1.")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
    if self.method == "fd" and self.lam != 0.0 and not self.eps > 0:
      raise ValueError(f"eps={self.eps} must be > 0 for method='fd'.")
    if self.method == "poe" and not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"lam={self.lam} with method='poe' is the proxy's weight gamma in the "
                       "product of experts (1 - gamma) log p_T + gamma log p_P: it must be in "
                       "[0, 1].")
    if self.method == "poe" and self.placement != "paper":
      raise ValueError(f"placement={self.placement!r} with method='poe': the product of experts "
                       "has one form (adjustment); leave placement at 'paper'.")

  @classmethod
  def reference(cls, *, tau: float, lam: float = 0.0, eps: float = 1e-2, method: str = "fd",
                max_length: int = 1024, seed: int = 0) -> "SamplingParams":
    """The authors' sampler: Delta added to the raw teacher logits before the temperature
    (lam here = tau * lam_paper), then Hugging Face's default top_k=50 and top_p=0.95 (greedy
    when tau=0), and max_length=1024 counting the left-padded prompt. fd at eps as theirs;
    `method="jvp"` gives the exact derivative their eps approximates."""
    sampled = tau > 0
    return cls(max_new_tokens=max_length, tau=tau, lam=lam, eps=eps, method=method,
               placement="reference", top_p=0.95 if sampled else None,
               top_k=50 if sampled else None, max_length=max_length, seed=seed)

  @property
  def uses_proxy(self) -> bool:
    return self.lam != 0.0

  def as_dict(self) -> dict:
    """The fields, as recorded in trace sidecars and pipeline keys; delta_on only when it is
    not the default "vocab" (a field added later: files and keys written before it stay
    valid)."""
    d = dataclasses.asdict(self)
    if d["delta_on"] == "vocab":
      d.pop("delta_on")
    return d


@dataclasses.dataclass
class Generation:
  """Per prompt: the generated ids (EOS included, padding excluded) and the teacher's log-prob
  (at temperature 1, unperturbed) of each of them."""
  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  finished: np.ndarray  # [num_prompts] bool: ended with an EOS id
  decode_steps: int = 0  # decode steps run, summed over batches (stops early once all finish)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(t) for t in self.tokens], np.int32)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _is_abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _with_layouts(abstract, like, stacked: bool = False):
  """ShapeDtypeStructs of `abstract` given the shardings of the matching leaves of `like`
  (jax.eval_shape drops them); stacked: abstract leaves have a leading axis of 2 that `like`
  lacks, left unsharded."""
  def one(a, l):
    sharding = getattr(l, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and stacked:
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
          None, *sharding.spec))
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  return jax.tree.map(one, abstract, like)


class Sampler:
  """Samples from a teacher, antidistilled by a proxy along g when params.lam != 0.

  Built once per (teacher, proxy, g) and called with `SamplingParams` for each setting of a
  sweep; it keeps the split models, the proxy side prepared for the last (method, eps), and
  the jit cache keyed by shapes and the static part of the settings.

  tokenizer: gives the EOS ids, the pad id and the number of real tokens; rows of the
    embedding past it are padding and are never sampled. Without a tokenizer, pass
    vocab_size (and eos_ids / pad_id).
  vocab_size: ids that may be sampled (default: len(tokenizer), and at most the rows both
    teacher and proxy have).
  batch_size: prompts per compiled call (default: all prompts of a call).
  prompt_multiple: padded prompt lengths are multiples of it, so few shapes compile.
  mesh: batches are sharded over its `data` axis (rows padded to a multiple of its size).
  scan_chunk: decode steps per lax.scan chunk; a batch stops after the chunk in which all its
    rows finished (outputs do not depend on it).
  fd_stacked: fd runs its two proxy copies as one vmapped call (default; bench/sampling.py).
  jvp_stacked: jvp reads each proxy weight once per step (`models.bilinear`; default); False
    is jax.jvp's own rule, for benchmarks (the same Delta up to rounding).
  batching: "static" (default): prompts go in batches of batch_size, each decoding until its
    longest row ends. "continuous": batch_size slots decode all the prompts of a call, a
    finished row's slot taking the next prompt between scan chunks (`continuous`); the same
    tokens, faster when trace lengths vary. Every prompt is then padded to the call's longest.
  refill_rows: continuous batching's prefill width when slots free up (default: a quarter of
    the slots, at least 1).
  """

  def __init__(self, teacher: Transformer, tokenizer=None, *, proxy: Transformer | None = None,
               grad: Any = None, vocab_size: int | None = None,
               eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
               batch_size: int | None = None, prompt_multiple: int = 16,
               mesh: Mesh | None = None, scan_chunk: int = 32, fd_stacked: bool = True,
               jvp_stacked: bool = True,
               batching: str = "static", refill_rows: int | None = None):
    if tokenizer is None and vocab_size is None:
      raise ValueError(
          "Sampler needs the tokenizer (or vocab_size=): rows of the embedding table past the "
          "tokenizer are padding, and sampling them gives ids that cannot be decoded.")
    if proxy is None and grad is not None:
      raise ValueError("grad= without proxy=: g is the proxy's gradient; pass the proxy too.")
    if scan_chunk < 1:
      raise ValueError(f"scan_chunk={scan_chunk} must be >= 1.")
    if batching not in BATCHING:
      raise ValueError(f"batching={batching!r}; expected one of {BATCHING}.")
    if refill_rows is not None and refill_rows < 1:
      raise ValueError(f"refill_rows={refill_rows} must be >= 1.")
    self.teacher = teacher
    self.tokenizer = tokenizer
    self.config = teacher.config
    limit = teacher.config.vocab_size
    if tokenizer is not None:
      limit = min(limit, len(tokenizer))
    if proxy is not None:
      if grad is not None:  # without g the proxy serves method="poe" only
        gradients.check_compatible(proxy, grad)
      limit = min(limit, tok_lib.shared_vocab_size(teacher.config, proxy.config, tokenizer))
    self.vocab_size = min(limit, vocab_size) if vocab_size is not None else limit
    if eos_ids is None:
      eos_ids = tok_lib.eos_ids(tokenizer, teacher.config) if tokenizer is not None else ()
    self.eos_ids = tuple(int(e) for e in eos_ids)
    if pad_id is None:
      pad_id = getattr(tokenizer, "pad_token_id", None)
    self.pad_id = int(pad_id or 0)
    self.batch_size, self.prompt_multiple, self.mesh = batch_size, prompt_multiple, mesh
    self.scan_chunk, self.fd_stacked, self.jvp_stacked = scan_chunk, fd_stacked, jvp_stacked
    self.batching, self.refill_rows = batching, refill_rows
    self.teacher_def, self.teacher_state = nnx.split(teacher)
    self.proxy = proxy
    self.proxy_def = self._theta = None
    if proxy is not None:
      self.proxy_def, self._theta = nnx.split(proxy)
    self.grad = grad
    self._prepared_key, self._prepared = None, None

  # -- pieces ------------------------------------------------------------------------------

  def _static(self, params: SamplingParams) -> _Static:
    """The static part of params (callers take `proxy_state` first: it checks the proxy)."""
    chunk = min(self.scan_chunk, params.max_new_tokens)
    return _Static(
        num_steps=_round_up(params.max_new_tokens, chunk), chunk=chunk,
        greedy=params.tau == 0.0, top_k=params.top_k,
        top_p=params.top_p is not None and params.top_p < 1.0,
        uses_proxy=params.uses_proxy,
        # Without a proxy the method does not matter: every method shares the plain program.
        method=params.method if params.uses_proxy else "",
        placement="poe" if params.uses_proxy and params.method == "poe" else params.placement,
        fd_stacked=self.fd_stacked and params.uses_proxy,
        jvp_stacked=self.jvp_stacked and params.uses_proxy, eos_ids=self.eos_ids, pad_id=self.pad_id,
        vocab_size=self.vocab_size)

  def proxy_state(self, params: SamplingParams):
    """The prepared proxy side for params (None at lam=0): cached per (method, eps)."""
    if not params.uses_proxy:
      return None
    if self.proxy is None:
      raise ValueError(f"lam={params.lam} needs a proxy and its gradient: "
                       "Sampler(teacher, tokenizer, proxy=..., grad=...).")
    if params.method in ADS_METHODS and self.grad is None:
      raise ValueError(f"method={params.method!r} (ADS) needs g, the proxy's gradient: "
                       "Sampler(..., proxy=..., grad=...); without g only method='poe' runs.")
    key = (params.method, params.eps if params.method == "fd" else None)
    if key == self._prepared_key:
      return self._prepared
    theta, grad = self._theta, self.grad
    eps = jnp.float32(params.eps)
    if params.method == "poe":  # the proxy's own weights, as they are (abstract ones too)
      state = theta
    elif _is_abstract(theta):  # abstract weights (memory analysis): shapes, and theta's layouts
      if params.method == "jvp":
        state = _with_layouts(jax.eval_shape(_prepare_jvp, theta, grad), (theta, theta))
      else:
        fd = jax.eval_shape(functools.partial(_prepare_fd, stacked=self.fd_stacked),
                            theta, grad, eps)[0]
        state = (_with_layouts(fd, theta if self.fd_stacked else (theta, theta),
                               stacked=self.fd_stacked), eps)
    elif params.method == "jvp":
      self._prepared = None
      state = _prepare_jvp(theta, grad)
    else:
      previous = self._prepared
      self._prepared = None
      reuse = previous[0] if previous is not None and self._prepared_key[0] == "fd" else None
      params_state, stats = _prepare_fd(theta, grad, eps, stacked=self.fd_stacked,
                                        previous=reuse)
      warn_if_fd_rounds_away(jax.device_get(stats), params.eps, self.proxy.dtype)
      state = (params_state, eps)
    self._prepared_key, self._prepared = key, state
    return state

  def knobs(self, params: SamplingParams, prompt_len: int) -> Knobs:
    """The traced settings for a batch whose longest prompt has `prompt_len` tokens."""
    limit = params.max_new_tokens
    if params.max_length is not None:
      limit = min(limit, params.max_length - prompt_len)
      if limit < 1:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room under "
                         f"max_length={params.max_length}; drop it or raise max_length.")
    return Knobs(tau=jnp.float32(params.tau if params.tau > 0 else 1.0),
                 lam=jnp.float32(params.lam), top_p=jnp.float32(params.top_p or 1.0),
                 nucleus=jnp.bool_(params.delta_on == "nucleus"), limit=jnp.int32(limit))

  def _rows(self, prompts: Sequence[Sequence[int]], rows: int, seed: int, first_row: int):
    """Left-padded ids and mask [rows, P] (P: the longest prompt, rounded up to
    prompt_multiple) and per-row keys [rows] by global row index, unplaced."""
    length = _round_up(max(len(p) for p in prompts), self.prompt_multiple)
    ids, mask = left_pad(prompts, self.pad_id, length, rows)
    row_idx = jnp.asarray(first_row + np.arange(rows), jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_idx)
    return jnp.asarray(ids), jnp.asarray(mask), keys

  def batch_inputs(self, prompts: Sequence[Sequence[int]], rows: int, seed: int,
                   first_row: int = 0):
    """Left-padded ids and mask [rows, P] and per-row keys [rows], placed on the mesh."""
    return parallel.shard_batch(self._rows(prompts, rows, seed, first_row), self.mesh)

  def _args(self, batch, params: SamplingParams, prompt_len: int, budgets=None):
    rows = batch[0].shape[0]
    if budgets is None:
      budgets = parallel.shard_batch((np.full((rows,), params.max_new_tokens, np.int32),),
                                     self.mesh)[0]
    return ((self.teacher_def, self.teacher_state, self.proxy_def if params.uses_proxy else None,
             self.proxy_state(params), *batch, self.knobs(params, prompt_len), budgets),
            dict(s=self._static(params)))

  def run_batch(self, batch, params: SamplingParams, prompt_len: int, budgets=None):
    """The jitted program on one placed batch (ids, mask, keys): (DecodeOutputs, done [B],
    first bad step, steps run), on device. budgets: int32 [B] caps on each row's new tokens
    (placed like the batch; default: max_new_tokens)."""
    args, kw = self._args(batch, params, prompt_len, budgets)
    return _decode_program(*args, **kw)

  def lower(self, batch, params: SamplingParams, prompt_len: int | None = None):
    """The lowered program for one batch (HLO text, compile().memory_analysis()); batch may
    hold jax.ShapeDtypeStructs, and so may the models' states."""
    prompt_len = batch[0].shape[1] if prompt_len is None else prompt_len
    budgets = jax.ShapeDtypeStruct((batch[0].shape[0],), jnp.int32)
    args, kw = self._args(batch, params, prompt_len, budgets)
    return _decode_program.lower(*args, **kw)

  # -- the call ------------------------------------------------------------------------------

  def __call__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
               first_row: int = 0, budgets: Sequence[int] | None = None) -> Generation:
    """Samples a continuation of each prompt (token-id lists of any lengths).

    first_row: global index of prompts[0]; rows draw randomness by global index, so a resumed
      run (first_row > 0) reproduces an uninterrupted one.
    budgets: per prompt, a cap on its new tokens below params.max_new_tokens (a row stops
      there as at max_new_tokens: unfinished). Benchmarks use it to give traces of random
      models a chosen length distribution (bench/batching.py).
    """
    if not prompts:
      return Generation([], [], np.zeros((0,), bool), 0)
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt: every prompt needs at least one token.")
    rows = self.config.vocab_size
    bad = [i for i, p in enumerate(prompts) if min(p) < 0 or max(p) >= rows]
    if bad:
      raise ValueError(f"prompts {bad[:10]} hold token ids outside [0, {rows}), the teacher's "
                       "embedding rows; tokenize them with the teacher's tokenizer.")
    longest = max(len(p) for p in prompts)
    limit = self.config.max_position_embeddings
    if longest + params.max_new_tokens > limit and params.max_length is None:
      raise ValueError(
          f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
          f"teacher's max_position_embeddings={limit}; drop or truncate long prompts "
          "(data.prompts does it with max_prompt_length).")
    if budgets is not None:
      if len(budgets) != len(prompts) or min(budgets) < 0:
        raise ValueError(f"budgets: one cap >= 0 per prompt ({len(prompts)}), got "
                         f"{len(budgets)} with minimum {min(budgets, default=None)}.")
    budgets = np.asarray([params.max_new_tokens] * len(prompts) if budgets is None else budgets,
                         np.int32)
    if self.batching == "continuous":
      return self._continuous(prompts, params, first_row, budgets)
    batch_size = self.batch_size or len(prompts)
    rows = parallel.round_rows(min(batch_size, len(prompts)), self.mesh)
    out_tokens, out_logp, out_done = [], [], []
    t0, n_tokens, decode_steps = time.time(), 0, 0
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      batch = self.batch_inputs(chunk, rows, params.seed, first_row + start)
      budget_B = np.zeros((rows,), np.int32)  # the padding rows decode nothing
      budget_B[:len(chunk)] = budgets[start:start + len(chunk)]
      budget_B = parallel.shard_batch((budget_B,), self.mesh)[0]
      outs, done_B, first_bad, steps = parallel.to_host(
          self.run_batch(batch, params, max(len(p) for p in chunk), budget_B))
      decode_steps += int(steps)
      if first_bad >= 0:
        self._raise_non_finite(params, f"decode step {int(first_bad)} (prompts {start}.."
                                       f"{start + len(chunk) - 1})")
      for i in range(len(chunk)):
        n = int(np.sum(~outs.stopped_LB[:, i]))
        out_tokens.append(outs.tokens_LB[:n, i].tolist())
        out_logp.append(outs.logp_LB[:n, i].astype(np.float32))
        out_done.append(bool(done_B[i]))
        n_tokens += n
      logging.info("generated %d/%d prompts, %d tokens (%.1f tokens/s)", start + len(chunk),
                   len(prompts), n_tokens, n_tokens / max(time.time() - t0, 1e-9))
    return Generation(out_tokens, out_logp, np.array(out_done, bool), decode_steps)


  def _raise_non_finite(self, params: SamplingParams, where: str):
    where = (f"non-finite sampling logits at {where} with tau={params.tau}, teacher dtype "
             f"{self.teacher.dtype.name}")
    if not params.uses_proxy:
      raise FloatingPointError(f"{where}, no proxy: the teacher's own logits are not finite; "
                               "check its weights, or run it in float32/bfloat16.")
    raise FloatingPointError(
        f"{where}, lam={params.lam}, eps={params.eps}, method={params.method}, proxy dtype "
        f"{self.proxy.dtype.name}. Lower lam, use method='jvp' or a larger eps, or run the "
        "proxy in float32/bfloat16 instead of float16 (in the pipeline: the grid's lams or "
        "grid.calibrate, --config.sample.method, --config.sample.eps, --config.models.dtype); "
        "if g itself holds a NaN, recompute it.")

  def _continuous(self, prompts, params: SamplingParams, first_row: int,
                  budgets: np.ndarray) -> Generation:
    """Continuous batching (`continuous`): batch_size slots over every prompt of the call."""
    slots = parallel.round_rows(min(self.batch_size or len(prompts), len(prompts)), self.mesh)
    refill = self.refill_rows or max(1, slots // 4)
    rows = max(len(prompts), slots) + refill
    budget_Q = np.zeros((rows,), np.int32)
    budget_Q[:len(prompts)] = budgets
    queue = continuous.Queue(*parallel.replicate(
        (*self._rows(prompts, rows, params.seed, first_row), jnp.asarray(budget_Q)), self.mesh),
                             count=jnp.int32(len(prompts)))
    models = (self.teacher_def, self.teacher_state,
              self.proxy_def if params.uses_proxy else None, self.proxy_state(params))
    s, knobs = self._static(params), self.knobs(params, max(len(p) for p in prompts))
    t0 = time.time()
    sl = continuous.start_program(*models, queue, slots=slots, s=s)
    while True:
      sl = continuous.run_program(*models, queue, sl, knobs, jnp.int32(_SEGMENT_CHUNKS),
                                  refill_rows=refill, s=s)
      started, n_tokens, busy = jax.device_get(
          (sl.next_prompt, jnp.sum(sl.length_Q), continuous.busy_flag(queue, sl)))
      logging.info("continuous batching: %d/%d prompts started, %d tokens (%.1f tokens/s)",
                   started, len(prompts), n_tokens, n_tokens / max(time.time() - t0, 1e-9))
      if not busy:
        break
    tokens, logp, length_q, eos, first_bad, steps = parallel.to_host(
        (sl.tokens_QL, sl.logp_QL, sl.length_Q, sl.eos_Q, sl.decode.first_bad, sl.steps))
    if first_bad >= 0:
      self._raise_non_finite(params, f"continuous decode step {int(first_bad)}")
    n = len(prompts)
    return Generation([tokens[i, :length_q[i]].tolist() for i in range(n)],
                      [logp[i, :length_q[i]].astype(np.float32) for i in range(n)],
                      eos[:n].astype(bool), int(steps))


def generate(teacher: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
             tokenizer=None, *, first_row: int = 0, **sampler_kwargs) -> Generation:
  """One-shot `Sampler(teacher, tokenizer, **sampler_kwargs)(prompts, params)`; keep a Sampler
  to sample several settings (the proxy side is then prepared once per (method, eps))."""
  return Sampler(teacher, tokenizer, **sampler_kwargs)(prompts, params, first_row=first_row)
