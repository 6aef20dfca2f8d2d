"""Model configuration read from (and written back to) a Hugging Face `config.json`.

One decoder-only family covers the three models of the paper: Qwen2 / Qwen2.5 (the teacher
DeepSeek-R1-Distill-Qwen and the proxy) and Llama-3.x (the student). They differ only in
q/k/v biases, rope scaling, tied embeddings and an explicit `head_dim`, all read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent rope scaling (`rope_type: llama3`)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture description; hashable, so it can live in an nnx graphdef.

  Letters used for shapes across the code base: D = hidden_size, F = intermediate_size,
  N = num_heads, K = num_kv_heads, H = head_dim, V = vocab_size, L = num_layers.
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 32768
  # The source config.json, kept verbatim (as a JSON string to stay hashable) so that
  # `save_pretrained` writes back every field transformers expects, tokens ids included.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}."
          " (Qwen3/Gemma add q/k norms or other blocks this implementation does not have.)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_kv_heads}.")

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    eos = self.hf_config.get("eos_token_id")
    if eos is None:
      return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

  def num_params(self) -> int:
    d, f, n, k, h, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                        self.num_kv_heads, self.head_dim, self.vocab_size)
    attn = d * (n + 2 * k) * h + n * h * d
    attn += (n + 2 * k) * h * self.qkv_bias + d * self.o_bias
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    return self.num_layers * per_layer + d + v * d * (1 if self.tie_embeddings else 2)

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies [H/2] in float32, as transformers computes them."""
    h = self.head_dim
    inv = 1.0 / (self.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
    inv = inv.astype(np.float32)
    rs = self.rope_scaling
    if rs is None:
      return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
              / (rs.high_freq_factor - rs.low_freq_factor))
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_fields(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads rope_theta and scaling from either the old (top-level `rope_theta`, `rope_scaling`)
  or the transformers-5 (`rope_parameters`) layout."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
  merged = {**scaling, **params}
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  if rope_type in ("default", None):
    return float(theta), None
  if rope_type != "llama3":
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, llama3).")
  return float(theta), RopeScaling(
      factor=float(merged["factor"]),
      low_freq_factor=float(merged["low_freq_factor"]),
      high_freq_factor=float(merged["high_freq_factor"]),
      original_max_position_embeddings=int(merged["original_max_position_embeddings"]))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from the dict of a Hugging Face config.json."""
  model_type = hf.get("model_type")
  if model_type == "qwen2" and hf.get("use_sliding_window", False):
    raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu).")
  n = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n
  theta, scaling = _rope_fields(hf)
  attention_bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=n,
      num_kv_heads=hf.get("num_key_value_heads") or n,
      head_dim=head_dim,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      # Qwen2 always has q/k/v biases and no o bias; Llama's `attention_bias` covers q/k/v/o.
      qkv_bias=True if model_type == "qwen2" else attention_bias,
      o_bias=False if model_type == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      hf_config_json=json.dumps(hf, sort_keys=True),
  )


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
  """Reads `path/config.json` (or `path` itself if it is the file)."""
  path = os.fspath(path)
  file = path if path.endswith(".json") else os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"No config.json at {file!r}: pass a local Hugging Face model "
                            "directory (config.json + *.safetensors + tokenizer files).")
  with open(file) as f:
    return config_from_hf(json.load(f))


def config_to_hf(cfg: ModelConfig, dtype: Any = None) -> dict[str, Any]:
  """The config.json dict for `cfg`: the source config with the architecture fields updated."""
  hf = cfg.hf_config
  hf.update(
      model_type=cfg.model_type,
      architectures=["Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"],
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings,
      hidden_act="silu",
  )
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
            **dataclasses.asdict(cfg.rope_scaling)}
  hf["rope_parameters"] = rope
  hf.pop("rope_scaling", None)
  hf.pop("rope_theta", None)
  if cfg.model_type == "llama":
    hf["attention_bias"] = cfg.qkv_bias
    hf["mlp_bias"] = cfg.mlp_bias
  if dtype is not None:
    hf["dtype"] = jnp.dtype(dtype).name
  return hf
