"""Where Delta applies (SamplingParams.delta_on): the authors' placement ("vocab": lam * Delta on
every token, then top-p of the adjusted logits) against the teacher's nucleus ("nucleus": top-p
of the teacher's own logits, then lam * Delta inside that set), on a finished run's teacher,
proxy and g.

  python bench/delta_on.py --config=configs/synthetic_study.py:fixed_writing \
      --workdir=runs/study --chain_seed=0 --lams=0.05,0.1,0.2
  python bench/delta_on.py --config=configs/gsm8k_paper.py --workdir=runs/smollm2 \
      --config.models.teacher=X.gguf ... --lams=0.01,0.03,0.1

The run's models, holdout and grad stages are run first (reused where finished). On the first
--n test problems, for lam = 0 and each --lams, under both placements (tau --tau, top-p --top_p,
the run's max_new_tokens and seed), it records per token set:
  accuracy        the teacher's, graded as the run grades (what users get);
  logprob         the teacher's mean log-prob per generated token (tau 1, unperturbed);
  outside         the share of tokens outside the teacher's own top-p set at their step
                  (nucleus placement: 0 by construction);
  delta_gain      the mean Delta (exact JVP, the proxy's d log p / d theta along g) of the
                  sampled tokens minus that of plain sampling's tokens: how far the sampling
                  moved towards what ADS aims at (first order: the proxy's loss rise per token).
A config of job "study" (synthetic_study.py) is one chain: --chain_seed picks its seed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from antidistill_jax import filters, pipeline, study, traces

import common  # bench/common.py (the script's folder is on sys.path)

_CONFIG = config_flags.DEFINE_config_file("config", None, "the run's config")
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (models/holdout/grad reused)")
_CHAIN_SEED = flags.DEFINE_integer("chain_seed", 0, "a study config's chain seed")
_N = flags.DEFINE_integer("n", 64, "test problems")
_LAMS = flags.DEFINE_list("lams", ["0.1"], "ADS lams (the run's lam scale)")
_TAU = flags.DEFINE_float("tau", 1.0, "temperature")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus mass (both placements)")
_ROWS = flags.DEFINE_integer("rows", 4, "rows per Delta / teacher forward pass (memory)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON report here (default: printed only)")


def token_metrics(teacher, proxy, grad, rows, tau: float, top_p: float, chunk: int):
  """Per row of generated tokens: teacher log-probs (tau 1), whether each token is outside the
  teacher's top-p set at tau, and the exact Delta of each token. Unpadded rows, `chunk` at a
  time (right-padded to the chunk's longest)."""
  graphdef, theta = nnx.split(proxy)
  tangent = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, theta)

  @jax.jit
  def per_token(ids_BT, pad_BT):
    z_BTV = teacher(ids_BT, pad_BT).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(z_BTV, -1)
    b, t, v = logp_BTV.shape
    kept = filters.filter_logits((logp_BTV / tau).reshape(b * t, v), None, top_p)
    logp_proxy = lambda st: jax.nn.log_softmax(nnx.merge(graphdef, st)(ids_BT, pad_BT), -1)
    _, delta_BTW = jax.jvp(logp_proxy, (theta,), (tangent,))
    nxt = ids_BT[:, 1:, None]
    pick = lambda a: jnp.take_along_axis(a[:, :-1], nxt, -1)[..., 0]
    return (pick(logp_BTV), pick(~jnp.isfinite(kept.reshape(b, t, v))),
            pick(delta_BTW.astype(jnp.float32)))

  out = dict(logprob=[], outside=[], delta=[])
  for start in range(0, len(rows), chunk):
    part = rows[start:start + chunk]
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in part]
    length = -(-max(len(s) for s in seqs) // 32) * 32
    ids = np.zeros((len(seqs), length), np.int32)
    pad = np.zeros_like(ids)
    for i, s in enumerate(seqs):
      ids[i, :len(s)], pad[i, :len(s)] = s, 1
    logp, outside, delta = (np.asarray(a) for a in per_token(jnp.asarray(ids), jnp.asarray(pad)))
    for i, r in enumerate(part):
      first, n = len(r["prompt_ids"]) - 1, len(r["completion_ids"])
      for key, a in (("logprob", logp), ("outside", outside), ("delta", delta)):
        out[key].append(a[i, first:first + n])
  return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def main(argv):
  del argv
  c = _CONFIG.value
  if c.job == "study":
    c = study.chain_config(lambda arm: c, study.Chain(str(c.study.arm), _CHAIN_SEED.value))
  x = pipeline.Experiment(c, _WORKDIR.value)
  x.run(["models", "holdout", "grad"])
  sampler = x.teacher_sampler(True)
  examples = x.split("test")[:_N.value]
  base = dataclasses.replace(
      x.point_params(pipeline.Point("ads", _TAU.value, 1.0, float(c.sample.eps))),
      top_p=_TOP_P.value, top_k=None)
  settings = x.trace_settings()
  results, plain_delta = [], None
  cells = [(0.0, "vocab")] + [(float(lam), on) for lam in _LAMS.value
                               for on in ("vocab", "nucleus")]
  with tempfile.TemporaryDirectory() as tmp:
    for k, (lam, on) in enumerate(cells):
      params = dataclasses.replace(base, lam=lam, delta_on=on)
      path = os.path.join(tmp, f"{k}.jsonl")
      meta = traces.generate_traces(sampler, examples, path, params=params,
                                    batch_size=c.sample.batch_size,
                                    **dict(settings, answer_forcing=False))
      rows = traces.read_traces(path)
      m = token_metrics(sampler.teacher, sampler.proxy, sampler.grad, rows, _TAU.value,
                        _TOP_P.value, _ROWS.value)
      if lam == 0.0:
        plain_delta = float(m["delta"].mean())
      results.append(dict(
          lam=lam, delta_on="plain" if lam == 0.0 else on,
          accuracy=meta["statistics"]["accuracy"], tokens=int(m["logprob"].size),
          logprob=float(m["logprob"].mean()), outside=float(m["outside"].mean()),
          delta_gain=float(m["delta"].mean()) - plain_delta,
          mean_length=float(np.mean([len(r["completion_ids"]) for r in rows]))))
      r = results[-1]
      print(f"lam {lam:g} {r['delta_on']}: accuracy {r['accuracy']:.3f}, log-prob "
            f"{r['logprob']:.3f}, outside {r['outside']:.3f}, Delta gain {r['delta_gain']:.3f}",
            flush=True)

  report = dict(config=c.pipeline.name or "", workdir=_WORKDIR.value, n=len(examples),
                tau=_TAU.value, top_p=_TOP_P.value, max_new_tokens=base.max_new_tokens,
                seed=base.seed, method=base.method, placement=base.placement,
                jax_device=str(jax.devices()[0].device_kind), results=results)
  print(f"\n{len(examples)} test problems, tau {_TAU.value}, top-p {_TOP_P.value}, "
        f"{base.max_new_tokens} new tokens, seed {base.seed}\n")
  print("| lam | Delta on | teacher accuracy | mean teacher log-prob | outside teacher top-p | "
        "Delta gain | mean length |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['lam']:g} | {r['delta_on']} | {r['accuracy']:.3f} | {r['logprob']:.3f} | "
          f"{r['outside']:.3f} | {r['delta_gain']:.3f} | {r['mean_length']:.1f} |")
  common.save_report(report, _OUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
