"""Time of the sampler's top-p draw against the unfiltered draw, and of the filters alone.

  python bench/filters.py                                  # [32, V], V in {4096, 152064}
  python bench/filters.py --vocabs=4096 --repeats=20 --top_k=50
  python bench/filters.py --support_noise=2                # sampled logits != support
  python bench/filters.py --passes --vocabs=152064         # what one pass over [B, V] costs

For each vocabulary size and logit distribution (random normal with std 0.5: near uniform,
like a random-weight model; std 5; peaked: a few dominant tokens over std-2 noise, like a
trained model), the jitted step is timed with one key per row:
  draw            `sampling.draw.categorical`, the sampler's unfiltered draw (ratios are to it);
  draw_first      `sampling.draw.filtered_categorical`, the sampler's top-p draw (Gumbel-max
                  first, then the drawn token's nucleus check);
  categorical     `jax.vmap(jax.random.categorical)`: the same tokens as draw, the old way;
  sort_free(+categorical), sorted(+categorical): `filters.filter_logits` and the sorting
                  reference alone, and followed by categorical (the sampler's top-p until
                  2026-12-06).
--support_noise s > 0 samples from the support plus N(0, s^2) noise (the support still chooses
the nucleus), as with delta_on="nucleus", where the first candidate is rejected more often.
A cell's time is the mean over --key_sets sets of row keys (steps) of the best of --repeats runs
after compilation, the variants interleaved so that load from other processes hits them alike:
draw_first costs more in steps where some row's first candidate is rejected, and the JSON says
how many rows a step that was. Prints one JSON line and a markdown table.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from antidistill_jax import filters
from antidistill_jax.sampling import draw

import common  # bench/common.py (the script's folder is on sys.path)

_VOCABS = flags.DEFINE_list("vocabs", ["4096", "152064"], "vocabulary sizes")
_BATCH = flags.DEFINE_integer("batch", 32, "rows")
_DISTS = flags.DEFINE_list("dists", ["flat", "std5", "peaked"], "logit distributions")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus mass (passed traced, as the sampler does)")
_TOP_K = flags.DEFINE_integer("top_k", None, "top-k before top-p (default: none)")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed runs per cell and key set (best is kept)")
_KEY_SETS = flags.DEFINE_integer("key_sets", 8, "sets of row keys (steps): a cell's time is the "
                                 "mean over them of the best of --repeats, since the draw's cost "
                                 "depends on how many rows the nucleus check rejects")
_SORTED_REPEATS = flags.DEFINE_integer("sorted_repeats", 3, "timed runs of the sorting filter "
                                       "(first key set only)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON here")
_SUPPORT_NOISE = flags.DEFINE_float("support_noise", 0.0, "std of the noise that makes the "
                                    "sampled logits differ from the support (0: the same)")
_PASSES = flags.DEFINE_bool("passes", False, "time the filter's kinds of pass over [B, V] "
                            "instead (where its time goes, and what a faster search could use)")


def make_logits(dist: str, batch: int, vocab: int, seed: int = 0) -> jax.Array:
  key = jax.random.key(seed)
  if dist == "flat":
    return 0.5 * jax.random.normal(key, (batch, vocab))
  if dist == "std5":
    return 5.0 * jax.random.normal(key, (batch, vocab))
  if dist == "peaked":  # four dominant tokens (about 0.8 / 0.1 / 0.04 / 0.005 of the mass)
    noise_BV = 2.0 * jax.random.normal(key, (batch, vocab))
    top_B4 = jax.random.randint(jax.random.fold_in(key, 1), (batch, 4), 0, vocab)
    boost_4 = jnp.array([14.0, 12.0, 11.0, 9.0])
    return noise_BV.at[jnp.arange(batch)[:, None], top_B4].add(boost_4)
  raise ValueError(f"dist={dist!r}; expected flat, std5 or peaked.")


def step_fns(top_k: int | None):
  """name -> jitted (support, sampled, top_p, keys) -> array, for every timed variant."""
  categorical = jax.vmap(jax.random.categorical)

  def old_way(filt):
    def fn(x, y, p, keys):
      kept = filt(x, p)
      return categorical(keys, jnp.where(jnp.isfinite(kept), y, -jnp.inf))
    return fn

  sort_free = lambda x, p: filters.filter_logits(x, top_k, p)
  sorted_ = lambda x, p: filters.filter_logits_sorted(x, top_k, p)
  fns = {
      "draw": lambda x, y, p, keys: draw.categorical(keys, y),
      "draw_first": lambda x, y, p, keys: draw.filtered_categorical(keys, y, x, top_k, p),
      "categorical": lambda x, y, p, keys: categorical(keys, y),
      "sort_free": lambda x, y, p, keys: sort_free(x, p),
      "sort_free+categorical": old_way(sort_free),
      "sorted": lambda x, y, p, keys: sorted_(x, p),
      "sorted+categorical": old_way(sorted_),
  }
  return {name: jax.jit(fn) for name, fn in fns.items()}


def best_seconds(fns, args, repeats: int, sorted_repeats: int) -> dict[str, float]:
  """The best of `repeats` round-robin runs of each fn on args; the sorted references get
  sorted_repeats runs (0: not run, left out)."""
  cells = {name: (fn, args) for name, fn in fns.items()}
  rounds = {name: sorted_repeats for name in fns if name.startswith("sorted")}
  return {name: min(t) for name, t in common.round_robin_seconds(cells, repeats, rounds).items()}


def pass_fns() -> dict:
  """name -> jitted (x, w, t, hi) -> array: the kinds of full-row pass the filter makes (x the
  logits, w = exp(x - max), t and hi [B, 1] thresholds), and the alternatives a faster search
  could use."""
  masked = lambda x, w, t, hi: jnp.sum(jnp.where((x > t) & (x <= hi), w, 0.0), -1)
  fns = {
      "max": lambda x, w, t, hi: jnp.max(x, -1),
      "exp_sum": lambda x, w, t, hi: jnp.sum(jnp.exp(x - jnp.max(x, -1, keepdims=True)), -1),
      "sum_w": lambda x, w, t, hi: jnp.sum(w, -1),
      "search_pass": masked,  # the filter's pass: reads x and w
      "one_compare": lambda x, w, t, hi: jnp.sum(jnp.where(x > t, w, 0.0), -1),
      "recompute_exp": lambda x, w, t, hi: jnp.sum(
          jnp.where((x > t) & (x <= hi), jnp.exp(x - hi), 0.0), -1),
      "w_space": lambda x, w, t, hi: jnp.sum(jnp.where(w > t, w, 0.0), -1),  # reads w only
      "2_pivots": lambda x, w, t, hi: [masked(x, w, t, hi), masked(x, w, t + 0.1, hi)],
      "4_pivots": lambda x, w, t, hi: [masked(x, w, t + 0.1 * k, hi) for k in range(4)],
      "draw": lambda x, w, t, hi: jax.random.categorical(jax.random.key(0), x),
  }
  return {name: jax.jit(fn) for name, fn in fns.items()}


def time_passes():
  fns = pass_fns()
  rows = []
  for vocab in map(int, _VOCABS.value):
    x = make_logits("flat", _BATCH.value, vocab)
    w = jnp.exp(x - jnp.max(x, -1, keepdims=True))
    t, hi = jnp.full((_BATCH.value, 1), 0.1), jnp.full((_BATCH.value, 1), 1.0)
    best = best_seconds(fns, (x, w, t, hi), _REPEATS.value, _REPEATS.value)
    rows += [dict(vocab=vocab, variant=name, ms=round(sec * 1e3, 3)) for name, sec in best.items()]
  result = dict(bench="filter_passes", backend=jax.default_backend(),
                device=str(jax.devices()[0]), batch=_BATCH.value, repeats=_REPEATS.value,
                rows=rows)
  print(json.dumps(result))
  print(f"\nOne pass over [{_BATCH.value}, V] float32, {jax.default_backend()}, ms (best of "
        f"{_REPEATS.value})\n")
  print("| pass | " + " | ".join(f"V={v}" for v in _VOCABS.value) + " |")
  print("|---|" + "---:|" * len(_VOCABS.value))
  for name in fns:
    print(f"| {name} | " + " | ".join(f"{r['ms']:.2f}" for r in rows if r["variant"] == name)
          + " |")


def main(argv):
  del argv
  if _PASSES.value:
    time_passes()
    return
  fns = step_fns(_TOP_K.value)
  rows = []
  p = jnp.float32(_TOP_P.value)
  for vocab in map(int, _VOCABS.value):
    for dist in _DISTS.value:
      support_BV = make_logits(dist, _BATCH.value, vocab)
      sampled_BV = support_BV + _SUPPORT_NOISE.value * jax.random.normal(
          jax.random.key(2), support_BV.shape)
      kept_BV = jnp.isfinite(filters.filter_logits(support_BV, _TOP_K.value, p))
      per_set, rejected, same = [], 0, 0
      for k in range(_KEY_SETS.value):
        keys_B = jax.random.split(jax.random.key(1 + k), _BATCH.value)
        args = (support_BV, sampled_BV, p, keys_B)
        first_B = fns["categorical"](*args)
        rejected += int(jnp.sum(~kept_BV[jnp.arange(_BATCH.value), first_B]))
        same += int(jnp.sum(fns["draw_first"](*args) == fns["sort_free+categorical"](*args)))
        per_set.append(best_seconds(fns, args, _REPEATS.value,
                                    _SORTED_REPEATS.value if k == 0 else 0))
      best = {n: float(np.mean([b[n] for b in per_set if n in b])) for n in fns}
      base = best["draw"]
      for name, seconds in best.items():
        rows.append(dict(vocab=vocab, dist=dist, variant=name, ms=round(seconds * 1e3, 3),
                         ratio=round(seconds / base, 3),
                         rejected_per_step=round(rejected / _KEY_SETS.value, 2)))
      print(f"V={vocab} {dist}: " + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in best.items())
            + f"; first candidates rejected: {rejected / _KEY_SETS.value:.2f} rows a step; "
            f"draw_first's tokens = the old way's in {same}/{_BATCH.value * _KEY_SETS.value}",
            flush=True)
  result = dict(bench="filters", backend=jax.default_backend(), device=str(jax.devices()[0]),
                batch=_BATCH.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                support_noise=_SUPPORT_NOISE.value, repeats=_REPEATS.value,
                key_sets=_KEY_SETS.value, rows=rows)
  print(json.dumps(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  names = list(fns)
  print(f"\n[{_BATCH.value}, V], top_p={_TOP_P.value}, top_k={_TOP_K.value}, "
        f"support_noise={_SUPPORT_NOISE.value}, {jax.default_backend()}: ms (x draw, the "
        "unfiltered draw)\n")
  print("| V | dist | " + " | ".join(names) + " |")
  print("|---|---|" + "---|" * len(names))
  for vocab in map(int, _VOCABS.value):
    for dist in _DISTS.value:
      cells = {r["variant"]: r for r in rows if r["vocab"] == vocab and r["dist"] == dist}
      print(f"| {vocab} | {dist} | " + " | ".join(
          f"{cells[n]['ms']:.2f} ({cells[n]['ratio']:.2f}x)" for n in names) + " |")


if __name__ == "__main__":
  app.run(main)
