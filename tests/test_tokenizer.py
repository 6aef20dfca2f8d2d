"""Tokenizer helpers: loading, chat templates to ids, the teacher/proxy shared vocabulary."""

import dataclasses

import pytest

from antidistill_jax import models
from antidistill_jax import tokenizer as tok_lib


def test_load_and_chat_ids(hf_checkpoint, tokenizer):
  path, _ = hf_checkpoint
  tok = tok_lib.load_tokenizer(path)
  messages = [{"role": "user", "content": "What is 12 + 30?"}]
  ids = tok_lib.chat_ids(tok, messages)
  assert all(isinstance(i, int) for i in ids)
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert ids == tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
  assert tok_lib.prompt_ids(tok, "What is 12 + 30?") == ids
  with_system = tok_lib.prompt_ids(tok, "What is 12 + 30?", system="Think step by step.")
  assert tok.decode(with_system).startswith("<|im_start|>system\nThink step by step.<|im_end|>")
  assert tok_lib.eos_ids(path) == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_missing_tokenizer_and_template_errors(tmp_path, tokenizer):
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    tok_lib.load_tokenizer(tmp_path)
  tokenizer.save_pretrained(tmp_path)
  tok = tok_lib.load_tokenizer(tmp_path)
  tok.chat_template = None
  with pytest.raises(ValueError, match="no chat_template"):
    tok_lib.chat_ids(tok, [{"role": "user", "content": "hi"}])


def test_shared_vocab_of_teacher_and_proxy(hf_checkpoint, tokenizer):
  cfg = models.load_config(hf_checkpoint[0])
  # The paper's pair: 152064 teacher rows, 151936 proxy rows, one 151665-token tokenizer.
  teacher = dataclasses.replace(cfg, vocab_size=152064)
  proxy = dataclasses.replace(cfg, vocab_size=151936)
  assert tok_lib.shared_vocab_size(teacher, proxy) == 151936
  assert tok_lib.shared_vocab_size(teacher, proxy, tokenizer) == 151936
  small = dataclasses.replace(cfg, vocab_size=len(tokenizer) - 1)
  with pytest.raises(ValueError, match=f"vocab mismatch: the tokenizer has {len(tokenizer)} tokens"):
    tok_lib.shared_vocab_size(teacher, small, tokenizer)
