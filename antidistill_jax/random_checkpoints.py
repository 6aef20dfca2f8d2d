"""Random tiny checkpoints made offline: a byte-level BPE tokenizer trained with `tokenizers`
and a randomly initialised Qwen2 / Llama written through `models.save_pretrained`.

They are real Hugging Face directories (config.json, model.safetensors, tokenizer.json with
a chat template) that everything else loads through the normal path, so demos and tests run
on a laptop with no hub access.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import jax.numpy as jnp
from flax import nnx

from antidistill_jax.models.checkpoint import save_pretrained
from antidistill_jax.models.config import config_from_hf
from antidistill_jax.models.transformer import Transformer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# ChatML, the format of the Qwen family; {system, user, assistant} turns.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The default corpus covers every byte-level symbol, digits and arithmetic words.
_DEFAULT_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. "
    "48 + 24 = 72. #### 72. The answer is 72. Let x = 3 * 4 - 5; then x = 7. "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) . , ? ! : ; $ % #")


def train_tokenizer(texts: Iterable[str] = (_DEFAULT_CORPUS,), vocab_size: int = 512):
  """A byte-level BPE PreTrainedTokenizerFast with ChatML special tokens and chat template."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer=trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=list(SPECIAL_TOKENS[1:]), chat_template=CHAT_TEMPLATE)


def tiny_hf_config(model_type: str = "qwen2", vocab_size: int = 512, **overrides: Any) -> dict:
  """config.json dict of a tiny model (a few hundred thousand parameters by default)."""
  hf = dict(model_type=model_type, vocab_size=vocab_size, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=model_type == "qwen2", bos_token_id=None)
  hf.update(overrides)
  return hf


def make_tiny_checkpoint(path: str | os.PathLike[str], *, model_type: str = "qwen2",
                         tokenizer=None, seed: int = 0, **config_overrides: Any) -> str:
  """Writes a random tiny model + tokenizer to `path` and returns the path."""
  path = os.fspath(path)
  tokenizer = tokenizer or train_tokenizer()
  # Pad the table to a multiple of 64 rows, as real checkpoints do (152064 = 64 * 2376).
  vocab = config_overrides.pop("vocab_size", -(-len(tokenizer) // 64) * 64)
  hf = tiny_hf_config(model_type, vocab, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **config_overrides)
  model = Transformer(config_from_hf(hf), dtype=jnp.float32, rngs=nnx.Rngs(seed))
  save_pretrained(model, path)
  tokenizer.save_pretrained(path)
  return path
