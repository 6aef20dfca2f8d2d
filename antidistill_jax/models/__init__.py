"""Flax NNX models of the Llama-3.x / Qwen2 family, with Hugging Face checkpoint I/O.

Shape letters. An array's name ends in its shape, one letter per axis (`logits_BTV`); across
antidistill_jax each letter has one meaning, the one below. A role (teacher, proxy, the fd pair's
plus and minus) goes in the word part of the name, never in the shape: `teacher_logits_BV`,
`proxy_cache`.

  B   batch rows
  T   query length: the positions one forward pass computes (the whole sequence of a loss,
      the prompt in prefill, 1 in decode)
  S   key length: the KV cache's slots
  P   padded prompt length (prefill's T; the cache's first P slots)
  L   decode steps of a sampling program (max_new_tokens rounded up to whole scan chunks)
  C   one chunk of an axis that is processed in pieces: loss positions unembedded at a time,
      decode steps of one scan, a slice of the vocabulary in `filters.top_values`
  M   the number of those chunks
  N   query heads
  K   key/value heads
  G   N / K, query heads per key/value head
  H   head dim
  R   H / 2, the rotary frequencies
  D   model (residual) dim
  F   MLP hidden dim
  I   input features of a LoRA-wrapped projection
  O   output features of a LoRA-wrapped projection
  V   vocabulary: a model's embedding rows (the teacher's where teacher and proxy meet)
  W   the proxy's embedding rows: Delta's axis before it is cut or padded to the teacher's V
  E   values a top-k keeps (top_k, or the nucleus search's candidates)
  X   an axis a helper takes at any of several sizes: rope's heads (N for queries, K for keys),
      the row `filters._top_k_values` searches (V, or E * C)
  1   an axis of size 1 kept for broadcasting (keepdims)
  2   the fd pair (theta + eps g, theta - eps g) stacked for one vmapped call
"""

from antidistill_jax.models.cache import KVCache
from antidistill_jax.models.checkpoint import (CheckpointError, abstract_model, check_checkpoint,
                                               from_pretrained, save_pretrained)
from antidistill_jax.models.config import ModelConfig, RopeScaling, config_from_hf, config_to_hf, load_config
from antidistill_jax.models.sharding import DEFAULT_RULES, shard_model
from antidistill_jax.models.transformer import Transformer, stack_tangents

__all__ = [
    "CheckpointError", "DEFAULT_RULES", "KVCache", "ModelConfig", "RopeScaling", "Transformer",
    "abstract_model", "config_from_hf", "config_to_hf", "from_pretrained", "load_config",
    "save_pretrained", "shard_model", "stack_tangents",
]
