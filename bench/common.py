"""Pieces the benchmarks share: the tiny model shapes, FLOPs per token, and the JSON output."""

from __future__ import annotations

import json
import os
from typing import Any

from antidistill_jax import models

# Tiny teacher and proxy whose non-embedding parameter counts are 4:1.
TEACHER_CFG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)
PROXY_CFG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=1)


def flops_per_token(cfg: models.ModelConfig) -> float:
  """2 x the parameters a token passes through (the embedding lookup is free; the unembedding
  matrix is counted once, tied or not)."""
  lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
  return 2.0 * (cfg.num_params() - lookup)


def save_report(report: dict[str, Any], path: str) -> None:
  """Writes the report as JSON to `path` and prints it as one line (after the table)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))
