"""Tokenizer helpers: load from a model directory, chat templates to id lists, shared vocab.

A teacher and its proxy share one tokenizer but may have embedding tables of different row
counts (DeepSeek-R1-Distill-Qwen-7B: 152064 rows, Qwen2.5-3B: 151936): the rows past the
tokenizer are padding. `shared_vocab_size` is the vocabulary both models define, the one on
which the antidistillation Delta is computed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from antidistill_jax.models.config import ModelConfig

Message = dict[str, str]


def load_tokenizer(path: str | os.PathLike[str]):
  """The Hugging Face tokenizer saved in a local model directory (never downloads)."""
  import transformers  # heavy import, only where a tokenizer is needed
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist.")
  files = set(os.listdir(path))
  if not files & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
    raise FileNotFoundError(f"no tokenizer files (tokenizer.json, ...) in {path!r}; save the "
                            "tokenizer next to the weights with tokenizer.save_pretrained(path).")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def _ids(encoded: Any) -> list[int]:
  # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
  if hasattr(encoded, "keys") and "input_ids" in encoded:
    encoded = encoded["input_ids"]
  return [int(i) for i in encoded]


def chat_ids(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat_template; set tokenizer.chat_template (a jinja "
                     "string) or save a tokenizer_config.json that has one.")
  return _ids(tokenizer.apply_chat_template(list(messages), tokenize=True,
                                            add_generation_prompt=add_generation_prompt))


def prompt_ids(tokenizer, user: str, *, system: str | None = None) -> list[int]:
  """Chat prompt ids for one user turn (and an optional system turn), ready to generate from."""
  messages = ([{"role": "system", "content": system}] if system else [])
  return chat_ids(tokenizer, messages + [{"role": "user", "content": user}])


def eos_ids(path_or_tokenizer, cfg: ModelConfig | None = None) -> tuple[int, ...]:
  """End-of-sequence ids: the tokenizer's eos, the config's, and generation_config.json's."""
  ids: set[int] = set()
  tok = path_or_tokenizer
  if isinstance(tok, (str, os.PathLike)):
    gen = os.path.join(os.fspath(tok), "generation_config.json")
    if os.path.exists(gen):
      with open(gen) as f:
        eos = json.load(f).get("eos_token_id")
      ids.update([eos] if isinstance(eos, int) else (eos or []))
    tok = load_tokenizer(tok)
  if tok.eos_token_id is not None:
    ids.add(int(tok.eos_token_id))
  if cfg is not None:
    ids.update(cfg.eos_token_ids)
  return tuple(sorted(ids))


def shared_vocab_size(teacher: ModelConfig, proxy: ModelConfig, tokenizer=None) -> int:
  """Rows defined by both models: min of the two tables, checked against the tokenizer.

  Raises if the tokenizer has ids that one of the models has no row for: then the two models
  cannot share it and Delta would be meaningless.
  """
  shared = min(teacher.vocab_size, proxy.vocab_size)
  if tokenizer is not None and len(tokenizer) > shared:
    raise ValueError(
        f"vocab mismatch: the tokenizer has {len(tokenizer)} tokens but the teacher has "
        f"{teacher.vocab_size} and the proxy {proxy.vocab_size} embedding rows. Teacher and "
        "proxy must share one tokenizer (e.g. DeepSeek-R1-Distill-Qwen with a Qwen2.5 proxy).")
  return shared
