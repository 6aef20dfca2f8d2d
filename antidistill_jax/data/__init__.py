"""Datasets as lists of `Example(problem, solution, answer, source_index)`.

    load_split("gsm8k", "train")                    # TFDS builder, downloads once, cached
    load_split("gsm8k", "holdout", manual_dir=DIR)  # offline: DIR/train.jsonl, DIR/test.jsonl
    load_split("jsonl:/path/file.jsonl", "all")     # a custom file, read directly

Names: "gsm8k" (splits train, holdout, test, platinum), "math" or "hendrycks_math" (train,
holdout, test), "mmlu" (train, holdout, test), "jsonl:PATH" (all, train, holdout: the seeded
70/30 split of the file). A JSONL row has problem/solution or question/answer fields; it is
graded like MATH (`grading.grader`). See `builders` for the sources and offline rules.
"""

from __future__ import annotations

import os

from antidistill_jax import grading
from antidistill_jax.data.records import (DEFAULT_SEED, TRAIN_FRACTION, Example,
                                          examples_from_rows, read_records,
                                          split_train_holdout)

# Other names of whole datasets, from the one table in grading (a name there that stands for a
# split, like gsm8k_platinum, is loaded as load_split("gsm8k", "platinum")).
ALIASES = {name: dataset for name, (dataset, split) in grading.DATASET_ALIASES.items()
           if split is None}


def _decode(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


JSONL_SPLITS = ("all", "train", "holdout")  # a JSONL file's: every row, or its 70/30 split


def load_jsonl(path: str, split: str = "all", *, seed: int = DEFAULT_SEED) -> list[Example]:
  """A custom JSONL dataset: every row ("all") or one side of its seeded 70/30 split."""
  if split not in JSONL_SPLITS:
    raise ValueError(f"split {split!r} of {path}: expected all, train or holdout.")
  examples = examples_from_rows(read_records(path, "jsonl"))
  if split == "all":
    return examples
  train, holdout = split_train_holdout(examples, seed)
  return train if split == "train" else holdout


def load_split(name: str, split: str, manual_dir: str | os.PathLike[str] | None = None,
               data_dir: str | os.PathLike[str] | None = None, *,
               seed: int = DEFAULT_SEED) -> list[Example]:
  """The examples of one split of a dataset, in the split's (seeded, deterministic) order.

  manual_dir: a folder holding the source files; given, nothing is downloaded, and a missing
    file raises `builders.MissingDataError` at once.
  data_dir: where TFDS keeps the prepared dataset (default ~/tensorflow_datasets).
  seed: the train/holdout shuffle; each seed is prepared once.
  """
  if name.startswith("jsonl:"):
    return load_jsonl(name[len("jsonl:"):], split, seed=seed)
  import tensorflow_datasets as tfds  # only the builders need it
  from antidistill_jax.data import builders

  key = ALIASES.get(name.lower(), name.lower())
  if key not in builders.BUILDERS:
    raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(builders.BUILDERS)}, "
                     f"{sorted(ALIASES)} or 'jsonl:/path/file.jsonl'.")
  cls = builders.BUILDERS[key]
  config = f"seed{seed}" if seed == DEFAULT_SEED else builders.split_config(seed)
  builder = cls(config=config, data_dir=None if data_dir is None else os.fspath(data_dir))
  if not builder.is_prepared():
    manual_dir = None if manual_dir is None else os.fspath(manual_dir)
    # Check before tfds starts: an explicit folder or no network means no download attempt.
    builders.resolve_sources(cls.name, cls.SOURCES, manual_dir or os.path.join(
        builder.data_dir_root, "downloads", "manual"), explicit=manual_dir is not None)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}"
                     + (" (platinum is built only when its file was there)." if key == "gsm8k"
                        else "."))
  source = builder.as_data_source(split=split)
  return [Example(problem=_decode(r["problem"]), solution=_decode(r["solution"]),
                  answer=_decode(r["answer"]), source_index=int(r["source_index"]))
          for r in (source[i] for i in range(len(source)))]


__all__ = ["DEFAULT_SEED", "TRAIN_FRACTION", "Example", "load_jsonl", "load_split",
           "read_records", "split_train_holdout"]
