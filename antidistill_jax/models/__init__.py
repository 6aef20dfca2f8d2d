"""Flax NNX models of the Llama-3.x / Qwen2 family, with Hugging Face checkpoint I/O."""

from antidistill_jax.models.cache import KVCache
from antidistill_jax.models.checkpoint import CheckpointError, abstract_model, from_pretrained, save_pretrained
from antidistill_jax.models.config import ModelConfig, RopeScaling, config_from_hf, config_to_hf, load_config
from antidistill_jax.models.sharding import DEFAULT_RULES, shard_model
from antidistill_jax.models.transformer import Transformer

__all__ = [
    "CheckpointError", "DEFAULT_RULES", "KVCache", "ModelConfig", "RopeScaling", "Transformer",
    "abstract_model", "config_from_hf", "config_to_hf", "from_pretrained", "load_config",
    "save_pretrained", "shard_model",
]
