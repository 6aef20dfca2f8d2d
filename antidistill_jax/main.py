"""Command-line entry point.

  python -m antidistill_jax.main                      # tiny random teacher, offline, seconds
  python -m antidistill_jax.main --config=configs/generate.py --config.checkpoint=DIR

Loads a teacher through `models.from_pretrained`, renders the prompts with its chat template
and samples with `sampling.generate`.
"""

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "generate.py")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG))
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() first (multi-host TPU/GPU jobs; "
    "launch/tpu.sh sets it)")


def run_generate(config) -> list[str]:
  import jax.numpy as jnp

  from antidistill_jax import models, sampling, tiny
  from antidistill_jax import tokenizer as tok_lib

  path = config.checkpoint
  if not path:
    path = os.path.join(config.workdir, "tiny_teacher")
    if not os.path.exists(os.path.join(path, "config.json")):
      logging.info("building a tiny random teacher at %s", path)
      tiny.make_tiny_checkpoint(path)
  teacher = models.from_pretrained(path, dtype=jnp.dtype(config.dtype))
  tokenizer = tok_lib.load_tokenizer(path)
  prompts = [tok_lib.prompt_ids(tokenizer, p, system=config.system_prompt or None)
             for p in config.prompts]
  start = time.time()
  out = sampling.generate(teacher, prompts, max_new_tokens=config.max_new_tokens, tau=config.tau,
                          top_p=config.top_p if config.tau > 0 else None, seed=config.seed,
                          eos_ids=tok_lib.eos_ids(path, teacher.config),
                          pad_id=tokenizer.pad_token_id or 0)
  seconds = time.time() - start
  texts = [tokenizer.decode(t) for t in out.tokens]
  for prompt, text, logp in zip(config.prompts, texts, out.logprobs):
    print(f"\n### {prompt}\n{text!r}\n(mean teacher log-prob {logp.mean():.3f})")
  print(f"\n{int(out.lengths.sum())} tokens in {seconds:.1f}s (compile included)")
  return texts


def main(argv):
  del argv
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
                 jax.device_count())
  run_generate(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
