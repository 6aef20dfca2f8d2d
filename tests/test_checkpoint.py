"""Checkpoint I/O: export roundtrip through transformers, strict errors, sharded files, meshes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from antidistill_jax import models, parallel
from conftest import torch_logits


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_tensors(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_export_roundtrip_loads_in_transformers(hf_checkpoint, tmp_path):
  import torch
  import transformers
  path, ref = hf_checkpoint
  model = models.from_pretrained(path)
  out = tmp_path / "export"
  models.save_pretrained(model, out)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = np.random.default_rng(0).integers(0, 320, size=(2, 40))
  np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(ref, ids))
  # And back into JAX: identical parameters.
  again = models.from_pretrained(out)
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))
  assert again.config == model.config


def test_sharded_export_with_index_roundtrips(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint
  model = models.from_pretrained(path)
  out = tmp_path / "sharded"
  models.save_pretrained(model, out, max_shard_bytes=50_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 2 and not (out / "model.safetensors").exists()
  ids = jnp.arange(30)[None]
  np.testing.assert_array_equal(np.asarray(models.from_pretrained(out)(ids)), np.asarray(model(ids)))
  os.remove(out / sorted(files)[1])
  with pytest.raises(FileNotFoundError, match=sorted(files)[1]):
    models.from_pretrained(out)


def test_bf16_export_loads_in_transformers(hf_checkpoint, tmp_path):
  import torch
  import transformers
  path, _ = hf_checkpoint
  model = models.from_pretrained(path, dtype=jnp.bfloat16)
  models.save_pretrained(model, tmp_path / "bf16")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert reloaded.dtype == torch.bfloat16
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  ids = np.arange(16)[None]
  ours = np.asarray(model(jnp.asarray(ids)))
  theirs = torch_logits(reloaded, ids)
  assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 5e-2


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / "c")
  _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(models.CheckpointError, match=r"parameters with no tensor: \['model.layers.1.mlp.up_proj.weight'\]"):
    models.from_pretrained(path)


def test_unmapped_tensor_is_named(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / "c")
  _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
  with pytest.raises(models.CheckpointError, match=r"tensors with no parameter: \['model.layers.0.self_attn.q_norm.weight'\]"):
    models.from_pretrained(path)


def test_misshaped_tensor_names_both_shapes(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / "c")
  name = "model.layers.0.self_attn.k_proj.weight"
  def truncate(t):
    t[name] = t[name][:-1]
  _edit_tensors(path, truncate)
  cfg = models.load_config(path)
  good = (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
  bad = (good[0] - 1, good[1])
  with pytest.raises(models.CheckpointError, match=rf"{name}.*shape \({bad[0]}, {bad[1]}\).*implies \({good[0]}, {good[1]}\)"):
    models.from_pretrained(path)


def test_nan_tensor_is_named(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / "c")
  def poison(t):
    t["model.norm.weight"][3] = np.nan
  _edit_tensors(path, poison)
  with pytest.raises(models.CheckpointError, match="'model.norm.weight'.*NaN"):
    models.from_pretrained(path)


def test_missing_files_fail_with_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json"):
    models.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(
      model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=1, num_attention_heads=4)))
  with pytest.raises(FileNotFoundError, match="No model.safetensors or model.safetensors.index.json"):
    models.from_pretrained(tmp_path)


def test_load_onto_a_mesh_places_shards_and_keeps_logits(hf_checkpoint):
  path, _ = hf_checkpoint
  assert len(jax.devices()) == 8
  explicit = jax.make_mesh((2, 4), ("data", "model"),
                           axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match=r"mesh axes \['data', 'model'\] are not Auto"):
    models.from_pretrained(path, mesh=explicit)
  mesh = parallel.make_mesh(data=-1, model=4)
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  sharded = models.from_pretrained(path, mesh=mesh)
  q = sharded.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4)
  down = sharded.layers[1].mlp.down_proj.kernel[...]
  assert down.sharding.spec == jax.sharding.PartitionSpec("model", None)
  emb = sharded.embed_tokens.embedding[...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("model", None)
  plain = models.from_pretrained(path)
  ids = jnp.arange(24).reshape(2, 12)
  np.testing.assert_allclose(np.asarray(sharded(ids)), np.asarray(plain(ids)), rtol=1e-5, atol=1e-5)
  # FSDP-style rules shard the model dimension over `data` instead.
  fsdp = models.from_pretrained(path, mesh=mesh, rules={"embed": "data"})
  assert fsdp.layers[0].self_attn.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec("data", None)
