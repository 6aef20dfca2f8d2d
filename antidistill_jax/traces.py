"""Teacher traces on disk: one JSONL row per kept prompt, a JSON sidecar with the settings and
statistics, and generation that survives being killed.

  sampler = sampling.Sampler(teacher, tok, proxy=proxy, grad=grad)
  params = sampling.SamplingParams(max_new_tokens=1024, tau=0.9, top_p=0.95, lam=0.2)
  meta = generate_traces(sampler, examples, "runs/x/train.jsonl", dataset="gsm8k",
                         params=params, batch_size=64)
  rows = read_traces("runs/x/train.jsonl")      # list of dicts, in example order
  meta = read_meta("runs/x/train.jsonl")         # runs/x/train.jsonl.meta.json

Row keys (later code reads them): index (position in `examples`), source_index, problem,
solution (gold), prompt_ids, completion_ids (EOS included), completion (decoded, special
tokens skipped), finished (ended with EOS), teacher_logprob (sum over the completion of the
unperturbed temperature-1 teacher log-probs), num_tokens, correct (raw grade), and with answer
forcing: forced (the decoded forced tokens) and forced_correct.

Sidecar: {"config": every setting that changes the rows, "counts": ..., "statistics": ...}.

Crash safety. Each finished batch is written as its own file `<path>.partial/<first row>.jsonl`
(whole-file atomic writes: a tmp file renamed locally, one object upload on gs://), next to
`<path>.partial/state.json` that holds the config. A new call with the same config resumes after
the last batch whose file exists; a batch killed midway left no file and is generated again with
`Sampler(..., first_row=...)`, whose randomness is per global row. Batches are the same fixed
slices of the prompt list in every run, so the finished file is byte-identical to an
uninterrupted run's. A call whose config differs from the stored one is refused with the
differing keys. When all rows are written, the sidecar is written, then the rows as `path`
(both atomically), then the partial folder is removed; a later call with the same config
returns the sidecar without generating. Nothing is appended in place, so `path` may be local
or a `gs://` object (`etils.epath`).

Several processes (multi-host): every process generates (the sampler's batch spans all of
them), only process 0 (`parallel.is_writer`) writes, and the resume row is process 0's.

Answer forcing (the reference's second accuracy): each trace, without its trailing EOS, is
continued by the tokens of `grading.answer_forcing_prefix(text)[len(text):]` (closes an
open think block, then FORCE_ANSWER), and the teacher adds FORCED_TOKENS greedy tokens with no
perturbation; `grading.forced_completion_text` + `is_correct` grade the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from etils import epath

from antidistill_jax import (errors, files, gradients, grading, monitoring, parallel, pytrees,
                             sampling)
from antidistill_jax.data.prompts import SYSTEM_PROMPT, build_prompts

FORMAT_VERSION = 2  # 2: the config stores SamplingParams (method, max_length)
FORCED_TOKENS = 32  # greedy tokens generated after FORCE_ANSWER, as in the reference
# Forced prefixes (prompt + whole trace) vary in length by up to max_new_tokens; a coarse
# padding multiple keeps the number of compiled shapes of the 32-step program small.
FORCE_PROMPT_MULTIPLE = 128


# -- paths and lines ------------------------------------------------------------------------


def meta_path(path: str | os.PathLike[str]) -> str:
  return os.fspath(path) + ".meta.json"


def partial_dir(path: str | os.PathLike[str]) -> epath.Path:
  """The folder of an unfinished run's batch files and state."""
  return epath.Path(os.fspath(path) + ".partial")


def _row_line(row: dict) -> bytes:
  return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _batch_file(partial: epath.Path, start: int) -> epath.Path:
  return partial / f"{start:09d}.jsonl"


# -- reading ------------------------------------------------------------------------------


def read_traces(path: str | os.PathLike[str]) -> list[dict]:
  """The rows of a finished trace file, in example order."""
  path = epath.Path(path)
  if not path.exists():
    partial = partial_dir(path)
    hint = (f"; {partial} holds an unfinished run: call generate_traces again with the same "
            "settings to finish it" if partial.exists() else "")
    raise FileNotFoundError(f"no trace file {os.fspath(path)!r}{hint}.")
  # Rows end with "\n" only: str.splitlines would also split inside a completion that holds
  # U+2028, U+0085 or other separators JSON leaves unescaped.
  return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")
          if line.strip()]


def read_meta(path: str | os.PathLike[str]) -> dict:
  """The sidecar of a finished trace file: config, counts, statistics."""
  mpath = meta_path(path)
  if not epath.Path(mpath).exists():
    raise FileNotFoundError(f"no sidecar {mpath!r} for trace file {os.fspath(path)!r}.")
  return files.read_json(mpath)


# -- config ----------------------------------------------------------------------------------


def _sha256(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def examples_sha256(examples: Sequence[Any]) -> str:
  """A short hash of `data.Example`s (problem, solution, source index): which examples a trace
  file (or a pipeline stage) was made from."""
  return _sha256([[e.problem, e.solution, int(e.source_index)] for e in examples])


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(stored: dict, wanted: dict) -> list[str]:
  """'key: stored X, now Y' for each (dotted) key whose value differs."""
  a, b = _flatten(stored), _flatten(wanted)
  missing = object()
  diffs = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      fmt = lambda v: "(absent)" if v is missing else repr(v)
      diffs.append(f"{k}: stored {fmt(va)}, now {fmt(vb)}")
  return diffs


def _check_config(stored: dict, wanted: dict, what: str, fix: str) -> None:
  diffs = config_differences(stored, wanted)
  if diffs:
    raise ValueError(f"{what} was generated with different settings ({'; '.join(diffs)}). "
                     f"{fix}")


def _forcing_suffix_tokens(tokenizer) -> int:
  """Tokens of the longest answer-forcing suffix: the one that also closes the think block."""
  return len(tokenizer.encode(grading.answer_forcing_prefix(""), add_special_tokens=False))


# -- answer forcing -------------------------------------------------------------------------


def forcing_prompt(tokenizer, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                   eos_ids: Sequence[int]) -> list[int]:
  """prompt + completion (trailing EOS removed) + the ids of the text that closes an open think
  block and appends FORCE_ANSWER. Whether the block is open is read from the text with special
  tokens kept (a `</think>` that the tokenizer treats as special still closes it)."""
  ids = list(completion_ids)
  if ids and ids[-1] in set(eos_ids):
    ids = ids[:-1]
  text = tokenizer.decode(ids, skip_special_tokens=False)
  suffix = grading.answer_forcing_prefix(text)[len(text):]
  return list(prompt_ids) + ids + tokenizer.encode(suffix, add_special_tokens=False)


# -- generation -----------------------------------------------------------------------------


def _pad_chunk(chunk: list[list[int]], rows: int) -> list[list[int]]:
  """Fills the last, short batch up to `rows` with copies of its first prompt so every batch
  runs the same compiled program; the copies' outputs are discarded."""
  return chunk + [chunk[0]] * (rows - len(chunk))


def _batch_rows(sampler, forcer, examples, prompts, start: int, *, config: dict,
                params: sampling.SamplingParams, dataset: str) -> tuple[list[dict], int]:
  """Generates, forces and grades the rows of one batch; returns them and their token count."""
  tokenizer, bs = sampler.tokenizer, config["batch_size"]
  prefill = config.get("prefill", "")
  pre = tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
  chunk = [list(p) + pre for p in prompts.ids[start:start + bs]]
  gen = sampler(_pad_chunk(chunk, bs), params, first_row=start)
  forced_texts = None
  if config["answer_forcing"]:
    forced_prompts = [forcing_prompt(tokenizer, p[:len(p) - len(pre)], pre + list(t),
                                     sampler.eos_ids) for p, t in zip(chunk, gen.tokens)]
    forced = forcer(_pad_chunk(forced_prompts, bs),
                    sampling.SamplingParams(max_new_tokens=config["forced_tokens"], tau=0.0))
    forced_texts = [tokenizer.decode(t, skip_special_tokens=True) for t in forced.tokens]
  rows, n_tokens = [], 0
  for i, prompt in enumerate(chunk):
    example = examples[prompts.indices[start + i]]
    ids = pre + [int(t) for t in gen.tokens[i]]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    row = dict(index=prompts.indices[start + i], source_index=int(example.source_index),
               problem=example.problem, solution=example.solution,
               prompt_ids=list(prompt)[:len(prompt) - len(pre)],
               completion_ids=ids, completion=text, finished=bool(gen.finished[i]),
               teacher_logprob=float(np.sum(gen.logprobs[i], dtype=np.float64)),
               num_tokens=len(ids),
               correct=grading.is_correct(dataset, example.solution, text))
    if forced_texts is not None:
      row["forced"] = forced_texts[i]
      row["forced_correct"] = grading.is_correct(
          dataset, example.solution, grading.forced_completion_text(text, forced_texts[i]))
    rows.append(row)
    n_tokens += len(ids)
  return rows, n_tokens


def _statistics(rows: list[dict], answer_forcing: bool, seconds: float) -> dict:
  mean = lambda xs: float(np.mean(xs)) if len(xs) else None
  lengths = np.array([r["num_tokens"] for r in rows], np.float64)
  q = lambda p: float(np.quantile(lengths, p)) if len(lengths) else None
  tokens = int(lengths.sum())
  return dict(
      accuracy=mean([r["correct"] for r in rows]),
      forced_accuracy=mean([r["forced_correct"] for r in rows]) if answer_forcing else None,
      fraction_finished=mean([r["finished"] for r in rows]),
      length_mean=mean(lengths), length_p10=q(0.1), length_p50=q(0.5), length_p90=q(0.9),
      length_max=int(lengths.max()) if len(lengths) else None,
      generated_tokens=tokens, seconds=seconds,
      tokens_per_second=tokens / seconds if seconds > 0 else None)


def prompt_limit(sampler: sampling.Sampler, params: sampling.SamplingParams,
                 max_prompt_length: int | None = None, answer_forcing: bool = True) -> int:
  """max_prompt_length, or by default the longest prompt for which prompt + max_new_tokens (+
  the answer-forcing suffix and its FORCED_TOKENS) fits in the teacher's context."""
  if max_prompt_length is not None:
    return max_prompt_length
  reserve = (_forcing_suffix_tokens(sampler.tokenizer) + FORCED_TOKENS) if answer_forcing else 0
  return sampler.teacher.config.max_position_embeddings - params.max_new_tokens - reserve


def generate_traces(sampler: sampling.Sampler, examples: Sequence[Any],
                    path: str | os.PathLike[str], *, dataset: str,
                    params: sampling.SamplingParams, batch_size: int,
                    system: str | None = SYSTEM_PROMPT, max_prompt_length: int | None = None,
                    answer_forcing: bool = True, split: str | None = None,
                    extra_config: dict | None = None, prefill: str = "") -> dict:
  """Samples one trace per example with `sampler` (its teacher, antidistilled by its proxy
  when params.lam != 0), grades it, and writes `path` (JSONL) and `path`.meta.json; returns
  the sidecar.

  examples: `data.Example`s; prompts longer than max_prompt_length are dropped (counted).
  max_prompt_length: default `prompt_limit`'s (it counts the prefill).
  prefill: text the response is made to begin with (the prefill attacker's): the teacher
    continues prompt + its tokens; a row's completion (text and ids) starts with it, its
    prompt_ids do not hold it, teacher_logprob counts only what the teacher sampled. "" is
    no prefill, to the bit.
  split, extra_config: recorded in the config (e.g. the teacher's path), so a resume or a
    rerun with other values is refused.
  The sampler's mesh shards each batch over `data`; it is not part of the config (a resumed
  run may use another topology, at the cost of bit-identity).
  """
  path = os.fspath(path)
  teacher, tokenizer, proxy = sampler.teacher, sampler.tokenizer, sampler.proxy
  if tokenizer is None:
    raise ValueError("generate_traces needs a Sampler built with the tokenizer "
                     "(Sampler(teacher, tokenizer, ...)): rows are decoded and graded.")
  max_prompt_length = prompt_limit(sampler, params, max_prompt_length, answer_forcing)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  prefill_ids = tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
  prompts = build_prompts(tokenizer, examples, max_prompt_length - len(prefill_ids),
                          system=system)
  if examples and not prompts.ids:
    raise errors.BadValue(
        f"all {len(examples)} prompts of {path} are longer than {max_prompt_length} tokens"
        + (f" less the prefill's {len(prefill_ids)}" if prefill_ids else "") + ": nothing to "
        "sample. Raise max_prompt_length (the pipeline's --config.prompts.max_prompt_length), "
        "within the model's context less the new tokens.")
  if params.uses_proxy and proxy is None:
    raise ValueError(f"lam={params.lam} needs a Sampler with a proxy and its gradient.")
  ads = params.uses_proxy
  config = dict(
      format=FORMAT_VERSION, dataset=dataset, split=split, num_examples=len(examples),
      examples_sha256=examples_sha256(examples),
      prompts_sha256=_sha256(prompts.ids), system=system, max_prompt_length=max_prompt_length,
      batch_size=batch_size, **params.as_dict(),
      eos_ids=list(sampler.eos_ids), pad_id=sampler.pad_id, vocab_size=sampler.vocab_size,
      teacher_fingerprint=gradients.fingerprint(teacher),
      # The proxy only matters when it perturbs: lam=0 rows are the same with or without it.
      proxy_fingerprint=gradients.fingerprint(proxy) if ads else None,
      grad_fingerprint=pytrees.fingerprint(sampler.grad) if ads else None,
      answer_forcing=answer_forcing, forced_tokens=FORCED_TOKENS if answer_forcing else None,
      extra=extra_config or {})
  if prefill:  # absent otherwise: an earlier run's sidecar still matches
    config["prefill"] = prefill
  config = json.loads(json.dumps(config))  # as it reads back from disk

  # Finished already? (process 0's view decides, on every process)
  writer, target, partial = parallel.is_writer(), epath.Path(path), partial_dir(path)
  if parallel.agree(target.exists()):
    if not epath.Path(meta_path(path)).exists():
      raise ValueError(f"{path} exists without its sidecar {meta_path(path)}; delete it or "
                       "write to another path.")
    meta = read_meta(path)
    _check_config(meta["config"], config, path,
                  f"Delete {path} and {meta_path(path)} to regenerate, or write to another path.")
    logging.info("%s is complete (%d rows); not regenerating.", path, meta["counts"]["rows"])
    if writer and partial.exists():
      partial.rmtree()  # left by a run killed between its last write and this cleanup
    return meta

  # Resume after the last whole batch, or start.
  n_total = len(prompts.ids)
  state_path = partial / "state.json"
  lines: list[bytes] = []
  seconds = 0.0
  if parallel.agree(state_path.exists()):
    state = files.read_json(state_path)
    _check_config(state["config"], config, os.fspath(partial),
                  "Rerun with the stored settings to resume it, or delete "
                  f"{partial} to start over (or write to another path).")
    seconds = float(state.get("seconds", 0.0))
    done = parallel.agree(state.get("rows", 0))  # rows in whole batch files, as process 0 saw
    for start in range(0, done, batch_size):
      lines += [line + b"\n" for line in _batch_file(partial, start).read_bytes().split(b"\n")[:-1]]
    for i, line in enumerate(lines):
      if json.loads(line)["index"] != prompts.indices[i]:
        raise ValueError(f"{partial} row {i} is not example {prompts.indices[i]}; the folder "
                         f"is not from this run: delete {partial}.")
    logging.info("resuming %s at row %d of %d.", path, len(lines), n_total)
  elif writer:
    files.makedirs(partial)
    files.write_json(state_path, dict(config=config, seconds=0.0, rows=0))

  # The answer-forcing continuation: greedy, unperturbed, with coarser prompt buckets.
  forcer = sampling.Sampler(teacher, tokenizer, vocab_size=sampler.vocab_size,
                            eos_ids=sampler.eos_ids, pad_id=sampler.pad_id,
                            prompt_multiple=FORCE_PROMPT_MULTIPLE, mesh=sampler.mesh,
                            scan_chunk=sampler.scan_chunk)
  done_tokens, t0 = 0, time.time()
  bar = monitoring.progress(n_total, os.path.basename(os.fspath(path)), unit="row",
                            initial=len(lines))
  with bar:
    for start in range(len(lines), n_total, batch_size):
      t_batch = time.time()
      rows, n_tokens = _batch_rows(sampler, forcer, examples, prompts, start, config=config,
                                   params=params, dataset=dataset)
      batch_lines = list(map(_row_line, rows))
      lines += batch_lines
      seconds += time.time() - t_batch
      if writer:  # the batch file, then the state that counts it
        files.write_atomic(_batch_file(partial, start), b"".join(batch_lines))
        files.write_json(state_path, dict(config=config, seconds=seconds, rows=len(lines)))
      done_tokens += n_tokens
      bar.update(len(rows), tokens_per_s=done_tokens / max(time.time() - t0, 1e-9))

  rows = [json.loads(line) for line in lines]
  if len(rows) != n_total:
    raise RuntimeError(f"{partial} has {len(rows)} rows after generation, expected {n_total}.")
  meta = dict(config=config,
              counts=dict(examples=len(examples), prompts=n_total, dropped=prompts.dropped,
                          rows=len(rows)),
              statistics=_statistics(rows, answer_forcing, seconds))
  if writer:
    files.write_json(meta_path(path), meta)
    files.write_atomic(target, b"".join(lines))
    partial.rmtree()
  parallel.sync(f"traces {os.fspath(path)}")
  s = meta["statistics"]
  logging.info("%s: %d rows, accuracy %s, forced %s, %.0f tokens/s", path, len(rows),
               s["accuracy"], s["forced_accuracy"], s["tokens_per_second"] or 0.0)
  return meta
