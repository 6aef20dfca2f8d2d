"""TFDS builders for GSM8K, MATH and MMLU that need no tensorflow.

Each builder takes its source files from the manual folder when they are there, else
downloads them from the original source with tfds's download manager; it writes array_record
files that `as_data_source` reads back without tf.data. Splits:
  antidistill_gsm8k  train / holdout: GSM8K train shuffled with the config's seed, 70/30
                     (5,231 / 2,242); test: GSM8K test (1,319); platinum: GSM8K-Platinum
                     (1,209), when its file is there (always when downloading).
  antidistill_math   the 7 MATH subjects pooled: train / holdout of their train files, test.
  antidistill_mmlu   train / holdout of auxiliary_train, test; a question is rendered with
                     lettered choices and its solution is \\boxed{letter}.
The config carries the split seed (`seed42`, the default, or `SplitConfig(seed=...)`), so each
seed is built once and cached in its own folder of data_dir. Stored order is the split's
order (shuffling by tfds is off, so two builds are identical record by record).

Offline: no download is tried when the manual folder holds files (or `load_split` got an
explicit manual_dir), or when there is no network (ANTIDISTILL_OFFLINE, HF_HUB_OFFLINE or
HF_DATASETS_OFFLINE set, or the source host unreachable within 3 s); a missing file then
raises `MissingDataError` naming the files and the folder to put them in.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import threading
import urllib.parse
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from antidistill_jax import grading
from antidistill_jax.data import records

GSM8K_URL = ("https://raw.githubusercontent.com/openai/grade-school-math/master/"
             "grade_school_math/data/")
PLATINUM_URL = "https://huggingface.co/datasets/madrylab/gsm8k-platinum/resolve/main/"
MATH_URL = "https://huggingface.co/datasets/EleutherAI/hendrycks_math/resolve/main/"
MMLU_URL = "https://huggingface.co/datasets/cais/mmlu/resolve/main/"

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
OFFLINE_ENV = ("ANTIDISTILL_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


class MissingDataError(FileNotFoundError):
  """The source files are neither in the manual folder nor downloadable."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One source file: its path inside the manual folder and where it is downloaded from.

  A .parquet source may also be given as a .jsonl file of the same rows (and vice versa).
  """
  file: str
  url: str
  optional: bool = False

  @property
  def format(self) -> str:
    return os.path.splitext(self.file)[1].lstrip(".")


@dataclasses.dataclass(eq=False)
class SplitConfig(tfds.core.BuilderConfig):
  seed: int = records.DEFAULT_SEED


def split_config(seed: int) -> SplitConfig:
  return SplitConfig(name=f"seed{seed}", seed=seed,
                     description=f"train/holdout shuffled with seed {seed}")


# ---------------------------------------------------------------------------------------------
# Finding the source files: manual folder, else download, else a clear error.


def _offline_by_env() -> bool:
  return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
             for v in OFFLINE_ENV)


def _reachable(host: str) -> bool:
  """Whether a TCP connection to host:443 opens within PROBE_TIMEOUT_S (DNS included: the
  probe runs in a daemon thread so a stuck resolver cannot hang the caller)."""
  ok: list[bool] = []

  def probe():
    try:
      socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
      ok.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(PROBE_TIMEOUT_S + 0.5)
  return bool(ok)


def online(urls) -> bool:
  if _offline_by_env():
    return False
  return all(_reachable(h) for h in {urllib.parse.urlparse(u).hostname for u in urls})


def locate(sources: Mapping[str, Source], folder) -> dict[str, tuple[str, str]]:
  """(path, format) of each source present in `folder`, as named or with the other suffix."""
  found = {}
  if folder is None or not os.path.isdir(folder):
    return found
  for key, src in sources.items():
    stem = os.path.splitext(src.file)[0]
    for fmt in dict.fromkeys((src.format, "jsonl", "parquet")):
      path = os.path.join(folder, f"{stem}.{fmt}")
      if os.path.isfile(path):
        found[key] = (path, fmt)
        break
  return found


def _missing_message(name: str, sources: Mapping[str, Source], folder, reason: str) -> str:
  lines = [f"{name}: {reason}, and the source files are not in {folder}. Put them there "
           "(or give the folder that holds them: manual_dir=FOLDER, on the command line "
           "--config.data.manual_dir=FOLDER):"]
  for src in sources.values():
    optional = " (optional)" if src.optional else ""
    lines.append(f"  {os.path.join(folder, src.file)}{optional}  <- {src.url}")
  lines.append("A .parquet file may also be given as .jsonl with the same rows.")
  return "\n".join(lines)


def resolve_sources(name: str, sources: Mapping[str, Source], folder, *, explicit: bool,
                    dl_manager=None) -> dict[str, tuple[str, str]] | None:
  """(path, format) of every available source: local when the required ones are all in
  `folder`, else downloaded with `dl_manager` (None: only check, return None).

  Never downloads when `explicit` (the caller chose the folder) or offline: raises
  MissingDataError instead, within a few seconds.
  """
  found = locate(sources, folder)
  required = [k for k, s in sources.items() if not s.optional]
  if all(k in found for k in required):
    return found
  if explicit:
    raise MissingDataError(_missing_message(name, sources, folder, "manual_dir was given"))
  if not online(sources[k].url for k in required):
    raise MissingDataError(_missing_message(name, sources, folder, "there is no network"))
  if dl_manager is None:
    return None
  paths = dl_manager.download({k: sources[k].url for k in required})
  got = {k: (os.fspath(p), sources[k].format) for k, p in paths.items()}
  for key, src in sources.items():
    if src.optional:
      try:
        got[key] = (os.fspath(dl_manager.download(src.url)), src.format)
      except Exception as e:  # an extra split: build the rest without it
        logging.warning("%s: could not download optional %s (%s); skipping it.", name, src.url, e)
  return got


# ---------------------------------------------------------------------------------------------
# Builders.

_FEATURES = dict(problem=tfds.features.Text(), solution=tfds.features.Text(),
                 answer=tfds.features.Text(), source_index=tfds.features.Scalar(np.int64))


def _instructions(sources: Mapping[str, Source]) -> str:
  return "Put these files in the manual folder (manual_dir):\n" + "\n".join(
      f"  {s.file}  <- {s.url}" for s in sources.values())


def _row(problem: str, solution: str, answer: str, index: int) -> dict[str, Any]:
  return dict(problem=problem, solution=solution, answer=answer, source_index=index)


class _SplitBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared machinery: sources -> {split: rows}; subclasses define SOURCES and `_splits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded 70/30 train/holdout split (the shuffle is applied)."}
  BUILDER_CONFIGS = [split_config(records.DEFAULT_SEED)]
  SOURCES: dict[str, Source] = {}
  HOMEPAGE = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own lookup imports `importlib_resources`, which it installs only on Python < 3.9,
    # and fails for builders defined in a package; it only needs the file to find checksums.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(_FEATURES),
                                 homepage=self.HOMEPAGE, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    # tfds keeps the manual folder (given or <data_dir>/downloads/manual) privately; files
    # put in it count as the user's choice, so they are never silently replaced by downloads.
    folder = os.fspath(getattr(dl_manager, "_manual_dir", None)
                       or dl_manager.download_dir / "manual")
    explicit = os.path.isdir(folder) and bool(os.listdir(folder))
    paths = resolve_sources(self.name, self.SOURCES, folder, explicit=explicit,
                            dl_manager=dl_manager)
    rows = {key: records.read_records(path, fmt) for key, (path, fmt) in paths.items()}
    return {split: self._generate_examples(out) for split, out in self._splits(rows).items()}

  def _splits(self, rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    raise NotImplementedError

  def _generate_examples(self, rows: list[dict]) -> Iterator[tuple[int, dict]]:
    yield from enumerate(rows)

  def _train_holdout(self, pool: list[dict]) -> dict[str, list[dict]]:
    train, holdout = records.split_train_holdout(pool, self.builder_config.seed)
    return {"train": train, "holdout": holdout}


def _gsm8k_rows(rows: list[dict]) -> list[dict]:
  return [_row(r["question"], r["answer"], grading.extract_answer("gsm8k", r["answer"]) or "",
               i) for i, r in enumerate(rows)]


class Gsm8kBuilder(_SplitBuilder):
  name = "antidistill_gsm8k"
  HOMEPAGE = "https://github.com/openai/grade-school-math"
  SOURCES = {
      "train": Source("train.jsonl", GSM8K_URL + "train.jsonl"),
      "test": Source("test.jsonl", GSM8K_URL + "test.jsonl"),
      "platinum": Source("platinum_test.parquet",
                         PLATINUM_URL + "main/test-00000-of-00001.parquet", optional=True),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SOURCES)

  def _splits(self, rows):
    splits = self._train_holdout(_gsm8k_rows(rows["train"]))
    splits["test"] = _gsm8k_rows(rows["test"])
    if "platinum" in rows:
      splits["platinum"] = _gsm8k_rows(rows["platinum"])
    return splits


def _math_rows(rows: list[dict]) -> list[dict]:
  return [_row(r["problem"], r["solution"], grading.last_boxed(r["solution"]) or "", i)
          for i, r in enumerate(rows)]


class MathBuilder(_SplitBuilder):
  """Hendrycks MATH (competition_math), as EleutherAI/hendrycks_math lays it out."""
  name = "antidistill_math"
  HOMEPAGE = "https://github.com/hendrycks/math"
  SOURCES = {f"{subject}/{split}": Source(f"{subject}/{split}-00000-of-00001.parquet",
                                          f"{MATH_URL}{subject}/{split}-00000-of-00001.parquet")
             for subject in MATH_SUBJECTS for split in ("train", "test")}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SOURCES)

  def _splits(self, rows):
    pooled = {split: [r for s in MATH_SUBJECTS for r in rows[f"{s}/{split}"]]
              for split in ("train", "test")}
    splits = self._train_holdout(_math_rows(pooled["train"]))
    splits["test"] = _math_rows(pooled["test"])
    return splits


def mmlu_problem(question: str, choices) -> str:
  """The question, then one "A. choice" line per choice (the reference's rendering)."""
  return question + "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))


def _mmlu_rows(rows: list[dict]) -> list[dict]:
  out = []
  for i, r in enumerate(rows):
    if isinstance(r.get("train"), dict):  # old cais/mmlu auxiliary_train nests its columns
      r = r["train"]
    answer = r["answer"]
    letter = answer.strip().upper() if isinstance(answer, str) else chr(65 + int(answer))
    out.append(_row(mmlu_problem(r["question"], r["choices"]), f"\\boxed{{{letter}}}", letter, i))
  return out


class MmluBuilder(_SplitBuilder):
  name = "antidistill_mmlu"
  HOMEPAGE = "https://github.com/hendrycks/test"
  SOURCES = {split: Source(f"all/{split}-00000-of-00001.parquet",
                           f"{MMLU_URL}all/{split}-00000-of-00001.parquet")
             for split in ("auxiliary_train", "test")}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SOURCES)

  def _splits(self, rows):
    splits = self._train_holdout(_mmlu_rows(rows["auxiliary_train"]))
    splits["test"] = _mmlu_rows(rows["test"])
    return splits


BUILDERS = {"gsm8k": Gsm8kBuilder, "math": MathBuilder, "mmlu": MmluBuilder}
