"""The synthetic task's models, trained from scratch: teachers, proxies and students that
actually solve it, written as Hugging Face checkpoints, and the task's tokenizer (one token per
byte) they share.

  tok = task_tokenizer()
  rows = example_rows(tok, synthetic.chains(64_000, split="train"))   # gold traces as rows
  teacher = dict(hidden_size=64, intermediate_size=192)  # shapes: configs/synthetic.py
  path, history = train_from_scratch("models/teacher", tokenizer=tok, rows=rows, shape=teacher,
                                     config=scratch_config())
  acc, texts = accuracy(models.from_pretrained(path), tok, synthetic.chains(256, split="test"))
  base, _ = train_from_scratch("models/student_base", tokenizer=tok, model_type="llama",
                               rows=pretraining_rows(tok, 16_000))  # optional

Training is the project's own distillation (`distill.distill`, full fine-tuning, completion-
only loss) on `distill.sft_examples` of the rows, with no system prompt, from a random
initialisation (or from `start_from`, e.g. a student pre-trained on an easier distribution).
So a teacher learns from gold traces, a proxy from teacher traces (`traces.read_traces` rows)
and a student from anything, through the same code path as a distilled student. The run is
resumable: distill checkpoints under `workdir` (default `<path>.train`), and the finished
model is written to `path` once (a later call returns it without training).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

from antidistill_jax import distill, grading, models, random_checkpoints, sampling
from antidistill_jax.data import synthetic
from antidistill_jax.data.prompts import build_prompts, user_message
from antidistill_jax.tokenizer import prompt_ids

MAX_LENGTH = 128  # prompt + trace tokens; a 5-term chain with its ChatML prompt is <= 64


def _byte_chars() -> list[str]:
  """The printable character byte-level BPE uses for each byte 0..255 (GPT-2's table)."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in kept:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def task_tokenizer():
  """The task's tokenizer: a byte-level PreTrainedTokenizerFast with no merges, so every byte
  is one token (and so every character of the synthetic task is); ids 0-4 are the ChatML
  SPECIAL_TOKENS and id 5 + b is byte b; eos "<|im_end|>", pad "<|endoftext|>" and
  CHAT_TEMPLATE as in `random_checkpoints.train_tokenizer`. Any text encodes (non-ASCII
  characters take one token per UTF-8 byte)."""
  import transformers
  from tokenizers import Tokenizer, decoders, pre_tokenizers
  from tokenizers import models as tokenizer_models
  special = random_checkpoints.SPECIAL_TOKENS
  vocab = {t: i for i, t in enumerate(special)}
  vocab.update({c: len(special) + b for b, c in enumerate(_byte_chars())})
  tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(special))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=list(special[1:]),
      chat_template=random_checkpoints.CHAT_TEMPLATE)


def scratch_config(**overrides: Any) -> distill.DistillConfig:
  """DistillConfig for training from scratch: full fine-tuning, one micro-batch per step,
  one padded length (64) for the whole task, few evaluations and checkpoints. lr 4e-3-6e-3
  trained d=64-96 models well; 1e-2 stalled (bench/synthetic_scale.py)."""
  settings = dict(lora_rank=None, learning_rate=4e-3, weight_decay=0.0, warmup_fraction=0.05,
                  epochs=1, batch_size=32, max_length=MAX_LENGTH, length_multiple=64,
                  eval_every=250, checkpoint_every=500)
  settings.update(overrides)
  settings.setdefault("micro_batch_size", settings["batch_size"])
  return distill.DistillConfig(**settings)


def random_model(tokenizer, *, model_type: str = "qwen2", seed: int = 0,
                 **shape: Any) -> models.Transformer:
  """A randomly initialised fp32 model for `tokenizer` (table padded to a multiple of 64 rows,
  EOS and pad ids from the tokenizer); shape: tiny_hf_config overrides (hidden_size, ...)."""
  vocab = shape.pop("vocab_size", -(-len(tokenizer) // 64) * 64)
  hf = random_checkpoints.tiny_hf_config(model_type, vocab, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **shape)
  return models.Transformer(models.config_from_hf(hf), dtype=jnp.float32, rngs=nnx.Rngs(seed))


def example_rows(tokenizer, examples: Sequence[Any]) -> list[dict]:
  """Gold solutions of `examples` as trace rows (the keys of `traces.read_traces` that training
  reads): the chat prompt with no system turn, the solution and its EOS, finished."""
  rows = []
  for i, e in enumerate(examples):
    completion = tokenizer.encode(e.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
    rows.append(dict(index=i, source_index=int(e.source_index), problem=e.problem,
                     solution=e.solution, prompt_ids=prompt_ids(tokenizer, user_message(e.problem)),
                     completion_ids=completion, completion=e.solution, finished=True))
  return rows


def pretraining_rows(tokenizer, n: int, *, seed: int = 0, max_terms: int = 3) -> list[dict]:
  """Rows of easier chains for a student's prior knowledge (train_from_scratch on them, then
  start_from the result): 2 to max_terms terms, written one fixed way (running total first,
  "," between steps), drawn from the "pretrain" split. At max_terms=3 a student so trained
  solves the short third of the real test set (~30%) and must learn the rest, and the
  teacher's ";" and term-first writings, from the traces it is distilled on."""
  return example_rows(tokenizer, synthetic.chains(n, split="pretrain", seed=seed, min_terms=2,
                                                  max_terms=max_terms, order="fixed",
                                                  separators=(",",)))


def _history(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "curves.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def train_from_scratch(path: str | os.PathLike[str], *, tokenizer, rows: Sequence[dict],
                       holdout_rows: Sequence[dict] = (), model_type: str = "qwen2",
                       shape: dict | None = None, config: distill.DistillConfig | None = None,
                       start_from: str | None = None, seed: int = 0,
                       max_steps: int | None = None, workdir: str | None = None
                       ) -> tuple[str | None, list[dict]]:
  """Trains a model on `rows` (trace rows: problem, completion, finished) and writes it with
  its tokenizer to `path`; returns (path, loss history).

  The model is random (model_type, shape, seed) unless start_from names a checkpoint to
  continue from. config: full fine-tuning only (lora_rank=None; default scratch_config()).
  max_steps stops early for a later call to resume: then nothing is written and the path
  returned is None. A `path` that already holds a model is returned as is.
  """
  path = os.fspath(path)
  workdir = workdir or path + ".train"
  if os.path.exists(os.path.join(path, "config.json")):
    return path, _history(workdir)
  config = config or scratch_config()
  if config.lora_rank:
    raise ValueError("train_from_scratch trains every weight: set lora_rank=None.")
  if start_from is not None:
    model = models.from_pretrained(start_from)
  else:
    model = random_model(tokenizer, model_type=model_type, seed=seed, **(shape or {}))
  config = dataclasses.replace(config, pad_id=tokenizer.pad_token_id or 0)
  train = distill.sft_examples(tokenizer, rows, system=None, max_length=config.max_length)
  held = distill.sft_examples(tokenizer, holdout_rows, system=None, max_length=config.max_length)
  trained, history = distill.distill(model, train, held, workdir, config, max_steps=max_steps)
  if not history or history[-1]["step"] < distill.num_steps(len(train), config):
    return None, history
  tmp = path + ".tmp"
  models.save_pretrained(trained, tmp)
  tokenizer.save_pretrained(tmp)
  os.replace(tmp, path)
  return path, history


def accuracy(model: models.Transformer, tokenizer, examples: Sequence[Any], *,
             tau: float = 0.0, top_p: float | None = None, max_new_tokens: int = 48,
             seed: int = 0, batch_size: int | None = None, dataset: str = "synthetic"
             ) -> tuple[float, list[str]]:
  """(accuracy, completion texts) of `model` sampled at temperature tau (0: greedy; top_p:
  nucleus filter) on `examples`, prompted with no system turn; held in memory
  (`evaluation.evaluate` writes traces to disk)."""
  prompts = build_prompts(tokenizer, examples, max_prompt_length=10**9, system=None)
  params = sampling.SamplingParams(max_new_tokens=max_new_tokens, tau=tau, top_p=top_p,
                                   seed=seed)
  gen = sampling.Sampler(model, tokenizer, batch_size=batch_size)(prompts.ids, params)
  texts = [tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
  return grading.accuracy(dataset, [e.solution for e in examples], texts), texts
