"""Our sampler against the authors' decode design in PyTorch: same process, same checkpoints,
same prompts and lengths.

  python bench/vs_reference.py                                    # batch 1, 8, 32
  python bench/vs_reference.py --batch_sizes=1,8 --max_new_tokens=32 --repeats=2
  python bench/vs_reference.py --checkpoint=SmolLM2-135M-Instruct.Q4_1.gguf --batch_sizes=1,8

--checkpoint: a real model (a .gguf file, converted by models.gguf, or an HF folder) as both
teacher and proxy, as a model owner with one model would try it; default, the tiny random pair
of bench/common.py. g is the proxy's gradient on random token ids (its content does not change
the time of a step).

torch (the authors' design, locuslab/antidistillation-sampling gentraces.py, re-written here):
  Hugging Face `model.generate(do_sample=True, temperature=tau, top_p=0.95)`; HF's default
  top_k=50 applies too, as it did for the authors, who did not override it (--top_k; 0 turns it
  off on both sides). ADS is a `LogitsProcessor` holding two copies of the proxy at theta + eps g
  and theta - eps g, each with its own KV cache kept across calls (the first call prefills the
  whole input_ids, later calls feed only the last token), that adds (lam / 2eps)(z_+ - z_-) to
  the teacher's scores. In transformers 5 `generate` runs user processors after its own
  processors and before the sampling warpers (temperature, top-k, top-p), so the delta lands on
  the raw logits, before the temperature: our placement="reference". As the authors ran it,
  renormalize_logits=True under ADS (a final log-softmax). g is OUR JAX gradient converted
  tensor by tensor to the HF parameter names (models.checkpoint.hf_name, kernels transposed).
ours: `sampling.Sampler` with SamplingParams(placement="reference", the same tau / top-k /
  top-p / lam / eps), method "fd" (two stacked perturbed copies) and "jvp" (exact derivative;
  it has no torch counterpart and is compared with the torch fd design).

Both sides generate exactly --max_new_tokens per row (no EOS; checked), from unpadded prompts
of --prompt_len random ids, in fp32. Times are the best of --repeats calls after one warm-up
call (compile on our side); our call returns host numpy data, so it is synchronous. torch runs
with as many threads as this process may use; XLA uses its default (all of them).
Memory: each cell's peak resident set of the process (Linux VmHWM, reset before the cell) and
the resident set before it; both sides' weights stay loaded throughout, so the difference
(peak - before) is what the cell itself added.

Before timing, the torch processor's first-step Delta (z_+ - z_-)/2eps is compared with
`sampling.delta(method="fd")` (up to a per-row constant: logits vs log-probs), and the teacher
logits of the two frameworks with each other; a mismatch aborts the run.

torch here is whatever build the venv holds (CPU-only in this project's venv). On a machine with
an accelerator JAX would use it while torch stays on the CPU: run with JAX_PLATFORMS=cpu for a
like-for-like record (the JSON records both devices).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from antidistill_jax import gradients, models, pytrees, random_checkpoints, sampling
from antidistill_jax.models.checkpoint import hf_name

import common  # bench/common.py (the script's folder is on sys.path)

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "batch sizes")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "prompt tokens (no padding)")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "generated tokens per row")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per cell (best is kept)")
_MODES = flags.DEFINE_list("modes", ["plain", "fd", "jvp"], "plain, fd, jvp (jvp: ours only)")
_TAU = flags.DEFINE_float("tau", 1.0, "temperature")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus mass")
_TOP_K = flags.DEFINE_integer("top_k", 50, "top-k on both sides (50: HF's default, as the "
                              "authors ran it; 0: off)")
_LAM = flags.DEFINE_float("lam", 1.0, "ADS weight (reference placement: lam_code)")
_EPS = flags.DEFINE_float("eps", 1e-2, "finite-difference step")
_THREADS = flags.DEFINE_integer("threads", 0, "torch threads (0: the cores this process may use)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a .gguf file or HF folder as teacher and "
                                  "proxy (default: the tiny random pair)")

TEACHER_CFG, PROXY_CFG = common.TEACHER_CFG, common.PROXY_CFG
# Relative tolerance of the Delta check (max |diff| / max |Delta|, fp32, eps = 1e-2).
DELTA_RTOL = 1e-2


flops_per_token = common.flops_per_token


# -- the torch side ---------------------------------------------------------------------------


def grad_to_torch(grad, hf_model) -> dict[str, torch.Tensor]:
  """Our flat gradient as {HF parameter name: fp32 tensor}; every parameter of `hf_model`
  (tied weights counted once, as named_parameters lists them) must get exactly one."""
  out = {}
  for path, value in pytrees.flatten(grad).items():
    name, transposed = hf_name(tuple(path.split("/")))
    array = np.asarray(value, np.float32)
    out[name] = torch.from_numpy(np.array(array.T if transposed else array, order="C"))
  params = dict(hf_model.named_parameters())
  if set(out) != set(params):
    raise ValueError(f"gradient / HF names differ: {sorted(set(out) ^ set(params))}")
  for name, p in params.items():
    if tuple(out[name].shape) != tuple(p.shape):
      raise ValueError(f"{name}: gradient {tuple(out[name].shape)} vs HF {tuple(p.shape)}")
  return out


def shifted_copy(hf_model, grad_pt: dict[str, torch.Tensor], step: float):
  """A copy of the proxy at theta + step * g (formed in fp32, cast to the parameter dtype)."""
  model = copy.deepcopy(hf_model)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((p.float() + step * grad_pt[name]).to(p.dtype))
  return model.eval()


class CachedProxy:
  """One perturbed proxy with its own KV cache: prefill on the first call, then one token."""

  def __init__(self, model):
    self.model, self.past = model, None

  def __call__(self, input_ids, attention_mask):
    if self.past is None:
      out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    else:
      out = self.model(input_ids=input_ids[:, -1:], attention_mask=attention_mask,
                       past_key_values=self.past, use_cache=True)
    self.past = out.past_key_values
    return out.logits[:, -1].float()


class ADSProcessor(transformers.LogitsProcessor):
  """scores + (lam / 2eps)(z_+ - z_-): the authors' logits processor, one per generate call."""

  def __init__(self, plus, minus, lam: float, eps: float, prompt_mask):
    self.plus, self.minus = CachedProxy(plus), CachedProxy(minus)
    self.lam, self.eps, self.prompt_mask = lam, eps, prompt_mask

  def fd_delta(self, input_ids):
    """(z_+ - z_-) / 2eps at the last position, advancing both caches."""
    extra = input_ids.shape[1] - self.prompt_mask.shape[1]
    mask = torch.nn.functional.pad(self.prompt_mask, (0, extra), value=1)
    return (self.plus(input_ids, mask) - self.minus(input_ids, mask)) / (2.0 * self.eps)

  def __call__(self, input_ids, scores):
    delta = self.fd_delta(input_ids)
    v = min(delta.shape[-1], scores.shape[-1])  # shared rows; the rest get no delta
    scores = scores.float().clone()
    scores[:, :v] += self.lam * delta[:, :v]
    return scores


def torch_generate(teacher, proxies, ids: torch.Tensor, mode: str, seed: int):
  mask = torch.ones_like(ids)
  kw = {}
  if mode == "fd":
    kw = dict(logits_processor=transformers.LogitsProcessorList(
        [ADSProcessor(*proxies, _LAM.value, _EPS.value, mask)]), renormalize_logits=True)
  torch.manual_seed(seed)
  with torch.inference_mode():
    return teacher.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=_TAU.value,
        top_p=_TOP_P.value, top_k=_TOP_K.value, max_new_tokens=_NEW_TOKENS.value,
        min_new_tokens=_NEW_TOKENS.value, eos_token_id=None, use_cache=True, **kw)


# -- cells ------------------------------------------------------------------------------------


def best_of(fn, repeats: int) -> tuple[float, Any, dict]:
  """Best time of `repeats` calls after a warm-up, the last output, and the cell's memory
  (GB): the resident set before it and its peak (warm-up included)."""
  before = common.reset_peak_rss()
  out = fn()  # warm-up: compile (ours), allocator and caches (both)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out, dict(rss_before_gb=before / 1e9, peak_rss_gb=common.peak_rss() / 1e9)


def load_pair(tmp):
  """(teacher, proxy) paths and the tokenizer's pad id: --checkpoint twice, or the tiny pair."""
  if _CHECKPOINT.value:
    path = _CHECKPOINT.value
    if path.endswith(".gguf"):
      from antidistill_jax.models import gguf
      path = gguf.local_folder(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return [path, path], pad
  tok = random_checkpoints.train_tokenizer(vocab_size=512)
  paths = [random_checkpoints.make_tiny_checkpoint(os.path.join(tmp, name), tokenizer=tok,
                                                   seed=seed, **cfg)
           for name, seed, cfg in (("teacher", 0, TEACHER_CFG), ("proxy", 1, PROXY_CFG))]
  return paths, tok.pad_token_id


def check_delta(proxy, grad, teacher, teacher_pt, proxies_pt, prompts) -> dict:
  """The torch processor's first-step Delta and teacher logits against ours (fp32)."""
  ids = np.asarray(prompts, np.int32)
  ids_pt = torch.from_numpy(ids).long()
  with torch.inference_mode():
    proc = ADSProcessor(*proxies_pt, _LAM.value, _EPS.value, torch.ones_like(ids_pt))
    d_pt = proc.fd_delta(ids_pt).numpy()
    z_pt = teacher_pt(input_ids=ids_pt).logits[:, -1].float().numpy()
  d_ours = np.asarray(sampling.delta(proxy, grad, ids, method="fd", eps=_EPS.value))
  d_jvp = np.asarray(sampling.delta(proxy, grad, ids, method="jvp"))
  z_ours = np.asarray(teacher(jnp.asarray(ids))[:, -1], np.float32)
  centre = lambda x: x - x.mean(-1, keepdims=True)  # logits vs log-probs: a per-row constant
  scale = float(np.abs(centre(d_ours)).max())
  diff = float(np.abs(centre(d_pt) - centre(d_ours)).max())
  res = dict(delta_max_abs=scale, delta_fd_torch_vs_ours_max_abs_diff=diff,
             delta_fd_rel=diff / scale,
             delta_fd_vs_jvp_rel=float(np.abs(centre(d_ours) - centre(d_jvp)).max()) / scale,
             teacher_logits_max_abs_diff=float(np.abs(z_pt - z_ours).max()))
  print(f"check: first-step Delta, torch processor vs sampling.delta(fd): max |diff| "
        f"{diff:.3g} (max |Delta| {scale:.3g}, rel {res['delta_fd_rel']:.2g}; ours fd vs jvp "
        f"rel {res['delta_fd_vs_jvp_rel']:.2g}); teacher logits torch vs ours max |diff| "
        f"{res['teacher_logits_max_abs_diff']:.2g}")
  if not res["delta_fd_rel"] < DELTA_RTOL or not res["teacher_logits_max_abs_diff"] < 1e-3:
    raise RuntimeError(f"the torch reference does not match ours: {res}")
  return res


def main(argv):
  del argv
  if not _TAU.value > 0:
    raise app.UsageError("--tau must be > 0: this compares sampling (do_sample=True).")
  threads = _THREADS.value or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  n, p = _NEW_TOKENS.value, _PROMPT_LEN.value
  with tempfile.TemporaryDirectory() as tmp:
    paths, pad_id = load_pair(tmp)
    teacher, proxy = (models.from_pretrained(x, dtype=jnp.float32) for x in paths)
    teacher_pt, proxy_pt = (transformers.AutoModelForCausalLM.from_pretrained(
        x, dtype=torch.float32).eval() for x in paths)
  teacher_pt.generation_config.eos_token_id = None  # exactly n tokens per row
  teacher_pt.generation_config.pad_token_id = pad_id
  vocab = min(teacher.config.vocab_size, proxy.config.vocab_size)

  rng = np.random.default_rng(0)
  examples = [(rng.integers(0, vocab, 32).tolist(), rng.integers(0, vocab, 64).tolist())
              for _ in range(4)]
  grad, _ = gradients.proxy_gradient(proxy, examples, micro_batch_size=4)
  grad_pt = grad_to_torch(grad, proxy_pt)
  proxies_pt = tuple(shifted_copy(proxy_pt, grad_pt, s * _EPS.value) for s in (1.0, -1.0))
  del proxy_pt

  c_t, c_p = flops_per_token(teacher.config), flops_per_token(proxy.config)
  ideal = 1.0 + 2.0 * c_p / c_t
  top_k = _TOP_K.value or None
  sampler = sampling.Sampler(teacher, None, vocab_size=teacher.config.vocab_size, eos_ids=(),
                             pad_id=pad_id, prompt_multiple=1, proxy=proxy, grad=grad)

  def ours(prompts, mode):
    lam = 0.0 if mode == "plain" else _LAM.value
    params = sampling.SamplingParams(
        max_new_tokens=n, tau=_TAU.value, top_p=_TOP_P.value, top_k=top_k, lam=lam,
        eps=_EPS.value, method="jvp" if mode == "jvp" else "fd", placement="reference")
    return sampler(prompts, params)

  check = check_delta(proxy, grad, teacher, teacher_pt, proxies_pt,
                      [rng.integers(0, vocab, p).tolist() for _ in range(4)])

  results = []
  for b in map(int, _BATCH_SIZES.value):
    prompts = [rng.integers(0, vocab, p).tolist() for _ in range(b)]
    ids_pt = torch.tensor(prompts, dtype=torch.long)
    cell = {}
    for mode in _MODES.value:
      if mode not in ("plain", "fd", "jvp"):
        raise ValueError(f"unknown mode {mode!r}")
      r = dict(batch=b, mode=mode)
      if mode != "jvp":
        secs, out, mem = best_of(
            lambda: torch_generate(teacher_pt, proxies_pt, ids_pt, mode, 0), _REPEATS.value)
        if tuple(out.shape) != (b, p + n):
          raise RuntimeError(f"torch generated {tuple(out.shape)}, expected {(b, p + n)}")
        r.update(torch_seconds=secs, torch_tokens_per_s=b * n / secs,
                 **{f"torch_{k}": v for k, v in mem.items()})
      secs, out, mem = best_of(lambda: ours(prompts, mode), _REPEATS.value)
      if not (np.all(out.lengths == n) and out.decode_steps == n):
        raise RuntimeError(f"ours generated lengths {set(out.lengths.tolist())}, "
                           f"{out.decode_steps} steps; expected {n}")
      r.update(ours_seconds=secs, ours_tokens_per_s=b * n / secs,
               **{f"ours_{k}": v for k, v in mem.items()})
      cell[mode] = r
      results.append(r)
    torch_fd = cell.get("fd", {}).get("torch_seconds")
    for mode, r in cell.items():
      if torch_fd is not None and mode == "jvp":
        r["torch_fd_seconds"] = torch_fd  # jvp's torch counterpart is the fd design
      t_torch = r.get("torch_seconds", r.get("torch_fd_seconds"))
      if t_torch is not None:
        r["ours_over_torch"] = t_torch / r["ours_seconds"]  # speed ratio (> 1: ours faster)
      if mode != "plain" and "plain" in cell:
        r["ours_overhead"] = r["ours_seconds"] / cell["plain"]["ours_seconds"]
        if "torch_seconds" in r:
          r["torch_overhead"] = r["torch_seconds"] / cell["plain"]["torch_seconds"]
      if mode == "jvp" and "fd" in cell:
        r["jvp_over_fd_time"] = r["ours_seconds"] / cell["fd"]["ours_seconds"]

  report = dict(
      jax_device=str(jax.devices()[0].device_kind), jax_platform=jax.default_backend(),
      torch_device="cpu", torch_threads=torch.get_num_threads(),
      cpu_cores_available=len(os.sched_getaffinity(0)), versions=dict(
          jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
      dtype="float32", teacher_params=teacher.config.num_params(),
      proxy_params=proxy.config.num_params(), flops_ratio_proxy_teacher=c_p / c_t,
      ideal_overhead=ideal, prompt_len=p, max_new_tokens=n, repeats=_REPEATS.value,
      tau=_TAU.value, top_p=_TOP_P.value, top_k=top_k, lam=_LAM.value, eps=_EPS.value,
      placement="reference", torch_attn=teacher_pt.config._attn_implementation,
      checkpoint=_CHECKPOINT.value or "tiny random pair (bench/common.py)",
      gradient="ours (JAX), converted to HF names", check=check, results=results)

  print(f"\n{report['checkpoint']}: jax {report['jax_platform']} ({report['jax_device']}) vs torch cpu "
        f"({report['torch_threads']} threads); fp32; teacher {report['teacher_params'] / 1e6:.2f}M"
        f" / proxy {report['proxy_params'] / 1e6:.2f}M params; prompt {p}, {n} new tokens; "
        f"tau {_TAU.value}, top_k {top_k}, top_p {_TOP_P.value}; best of {_REPEATS.value}; "
        f"ideal ADS overhead 1 + 2*C_p/C_t = {ideal:.2f}\n")
  fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)
  memory = lambda r, side: ("-" if f"{side}_peak_rss_gb" not in r else
                            f"{r[f'{side}_peak_rss_gb']:.2f} "
                            f"(+{r[f'{side}_peak_rss_gb'] - r[f'{side}_rss_before_gb']:.2f})")
  print("| batch | mode | torch tok/s | ours tok/s | ours/torch | torch overhead | "
        "ours overhead | ideal | jvp/fd time | torch peak GB (+cell) | ours peak GB (+cell) |")
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    t_rate = r.get("torch_tokens_per_s")
    torch_col = fmt(t_rate, "{:.1f}")
    if r["mode"] == "jvp" and "torch_fd_seconds" in r:
      torch_col = f"({r['batch'] * n / r['torch_fd_seconds']:.1f} fd)"
    print(f"| {r['batch']} | {r['mode']} | {torch_col} | {r['ours_tokens_per_s']:.1f} | "
          f"{fmt(r.get('ours_over_torch'))} | {fmt(r.get('torch_overhead'))} | "
          f"{fmt(r.get('ours_overhead'))} | {'-' if r['mode'] == 'plain' else f'{ideal:.2f}'} | "
          f"{fmt(r.get('jvp_over_fd_time'))} | {memory(r, 'torch')} | {memory(r, 'ours')} |")
  print("\nours/torch: speed ratio (> 1: ours faster); jvp rows compare with torch fd. overhead: "
        "ADS time / plain time of the same side; ideal: the FLOP ratio 1 + 2*C_p/C_t.")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  app.run(main)
