"""llama.cpp's GGUF files as Hugging Face checkpoint folders (the optional extra `gguf`).

  folder = gguf.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")  # once
  model = models.from_pretrained(folder)            # or any .gguf path where a checkpoint
  folder = gguf.local_folder("model.gguf")          # goes: converted once into the cache

The weights are dequantized to float32 with the `gguf` package (every ggml type it knows:
F32/F16/BF16, Q4_0/Q4_1/Q8_0, K-quants, ...); the q and k projections get back the row order
Hugging Face uses (llama.cpp's converter interleaves each head's rotary halves for its own rope);
the config comes from the file's `llama.*` metadata, the tokenizer from its `tokenizer.ggml.*`
fields (byte-level BPE with the file's merges and special tokens, and its chat template), built
with `tokenizers` alone, so neither torch nor llama.cpp is needed. Llama-architecture files only
(SmolLM, Llama 2/3, Mistral-style); the dequantized model is what the file holds, so a Q4 file
gives the Q4 model's function in float32, not the original checkpoint's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

# GGUF tensor names (llama.cpp) -> Hugging Face Llama names; {i} is the layer.
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens


def _reader(path: str):
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading .gguf files needs the `gguf` package: pip install "
                      "'antidistill_jax[gguf]' (or pip install gguf).") from e
  return gguf.GGUFReader(path)


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def unpermute_rope_rows(w_OI: np.ndarray, heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row order: per head, its converter stores the rows of the two
  rotary halves interleaved (row pairs); Hugging Face keeps each half contiguous."""
  out_dim = w_OI.shape[0]
  half = out_dim // heads // 2
  return w_OI.reshape(heads, half, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def hf_config(reader) -> dict:
  """The Hugging Face LlamaConfig fields of a GGUF file's metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r}: only 'llama' files convert (SmolLM, Llama, "
                     "Mistral-style).")
  get = lambda k, d=None: _field(reader, f"llama.{k}", d)
  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  names = {t.name for t in reader.tensors}
  tokens = _field(reader, "tokenizer.ggml.tokens")
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama",
      hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
      num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("rope.dimension_count", hidden // heads)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      max_position_embeddings=int(get("context_length", 2048)),
      vocab_size=int(get("vocab_size", len(tokens))),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
      hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="float32")


def hf_tensors(reader, config: dict) -> dict[str, np.ndarray]:
  """Every tensor dequantized to float32 under its Hugging Face name (q/k rows reordered)."""
  from gguf import quants
  out = {}
  for t in reader.tensors:
    if t.name in _TOP:
      name = _TOP[t.name]
    else:
      parts = t.name.split(".", 2)  # blk.{i}.rest
      if parts[0] != "blk" or parts[2] not in _LAYER:
        raise ValueError(f"GGUF tensor {t.name!r} has no Llama counterpart.")
      name = f"model.layers.{int(parts[1])}.{_LAYER[parts[2]]}"
    w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape([int(n) for n in reversed(t.shape)])  # ggml lists the fastest axis first
    if t.name.endswith("attn_q.weight"):
      w = unpermute_rope_rows(w, config["num_attention_heads"])
    elif t.name.endswith("attn_k.weight"):
      w = unpermute_rope_rows(w, config["num_key_value_heads"])
    out[name] = np.ascontiguousarray(w)
  return out


def hf_tokenizer(reader):
  """A PreTrainedTokenizerFast of the file's tokenizer.ggml.* fields (gpt2-style byte-level
  BPE, as transformers' own GGUF loading builds it)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') files convert.")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             ignore_merges=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  special = lambda key: (None if _field(reader, key) is None
                         else tokens[int(_field(reader, key))])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("tokenizer.ggml.bos_token_id"),
      eos_token=special("tokenizer.ggml.eos_token_id"),
      unk_token=special("tokenizer.ggml.unknown_token_id"),
      pad_token=special("tokenizer.ggml.padding_token_id"),
      additional_special_tokens=[t for t, k in zip(tokens, types) if k == _CONTROL],
      chat_template=_field(reader, "tokenizer.chat_template"))
  fast.add_bos_token = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
  return fast


def convert(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> str:
  """Writes out_dir/{config.json, model.safetensors, tokenizer files}: a folder that
  `models.from_pretrained` and `tokenizer.load_tokenizer` read. Returns out_dir."""
  from safetensors.numpy import save_file
  reader = _reader(os.fspath(gguf_path))
  config = hf_config(reader)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  save_file(hf_tensors(reader, config), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)
  hf_tokenizer(reader).save_pretrained(out_dir)
  return out_dir


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def local_folder(gguf_path: str | os.PathLike[str], cache_dir: str | None = None) -> str:
  """The converted folder of a .gguf file, made once under cache_dir (default
  files.cache_root()/gguf) and named by the file's hash; concurrent callers publish atomically
  (the first rename wins)."""
  from antidistill_jax import files
  gguf_path = os.fspath(gguf_path)
  root = cache_dir or os.fspath(files.cache_root() / "gguf")
  folder = os.path.join(root, file_sha256(gguf_path)[:16])
  if os.path.exists(os.path.join(folder, "config.json")):
    return folder
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".converting-", dir=root)
  try:
    convert(gguf_path, tmp)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process published it first
      pass
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder
