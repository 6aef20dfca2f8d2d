"""Compiled memory of one gradient of the completion NLL, whole vs chunked unembedding.

  python bench/loss_memory.py --vocab_sizes=32000,152064 --seq_len=1024 --batch=2

XLA's memory analysis of the jitted jax.grad (nothing is run, so large shapes are cheap to
measure on a CPU): temporaries for `gradients.token_nll(chunk=None)` against the default
chunked form. Prints a table and JSON.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from antidistill_jax import gradients, models, random_checkpoints

_VOCABS = flags.DEFINE_list("vocab_sizes", ["32000", "152064"], "vocabulary sizes")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "tokens per sequence")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per micro-batch")
_CHUNKS = flags.DEFINE_list("chunks", ["none", str(gradients.LOSS_CHUNK)], "loss chunks")


def temp_bytes(graphdef, params, ids, chunk):
  def loss(p, ids_BT):
    ones = jnp.ones_like(ids_BT)
    return jnp.sum(gradients.token_nll(nnx.merge(graphdef, p), ids_BT, ones, ones, chunk=chunk)[0])
  return jax.jit(jax.grad(loss)).lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  rows = []
  for vocab in map(int, _VOCABS.value):
    cfg = models.config_from_hf(random_checkpoints.tiny_hf_config("qwen2", vocab_size=vocab))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((_BATCH.value, _SEQ.value), jnp.int32)
    for chunk in _CHUNKS.value:
      c = None if chunk == "none" else int(chunk)
      rows.append(dict(vocab=vocab, chunk=chunk, temp_bytes=int(temp_bytes(graphdef, params, ids, c)),
                       logits_bytes=4 * _BATCH.value * _SEQ.value * vocab))
  print(f"device {jax.devices()[0].device_kind}, batch {_BATCH.value}, seq {_SEQ.value}, tiny "
        "Qwen2 body (hidden 64, 2 layers)")
  print(f"{'vocab':>7} {'chunk':>6} {'temp MiB':>9} {'fp32 logits MiB':>16}")
  for r in rows:
    print(f"{r['vocab']:7d} {r['chunk']:>6} {r['temp_bytes'] / 2**20:9.1f} "
          f"{r['logits_bytes'] / 2**20:16.1f}")
  print(json.dumps(dict(device=str(jax.devices()[0].device_kind), batch=_BATCH.value,
                        seq_len=_SEQ.value, results=rows)))


if __name__ == "__main__":
  app.run(main)
