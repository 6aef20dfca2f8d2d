"""Datasets: the GSM8K split (seeded, real shuffle, disjoint, sized), MATH and MMLU builders on
handmade files, JSONL datasets, the offline errors, and chat prompts.

GSM8K is read from ANTIDISTILL_GSM8K_DIR, else ../shared/data/gsm8k beside the repo (never
copied into it); TFDS data always goes to a tmp_path.
"""

import json
import os
import shutil
import time

import numpy as np
import pytest

from antidistill_jax import data
from antidistill_jax import grading
from antidistill_jax.data import builders, prompts
from antidistill_jax.tokenizer import prompt_ids

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GSM8K_DIR = os.environ.get("ANTIDISTILL_GSM8K_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
needs_gsm8k = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(GSM8K_DIR, f)) for f in ("train.jsonl", "test.jsonl")),
    reason=f"GSM8K train.jsonl/test.jsonl not in {GSM8K_DIR} (set ANTIDISTILL_GSM8K_DIR)")


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return {split: data.load_split("gsm8k", split, manual_dir=GSM8K_DIR, data_dir=data_dir)
          for split in ("train", "holdout", "test")}


@needs_gsm8k
def test_gsm8k_split_sizes_disjoint_and_shuffled(gsm8k):
  assert {k: len(v) for k, v in gsm8k.items()} == {"train": 5231, "holdout": 2242, "test": 1319}
  questions = {k: {e.problem for e in v} for k, v in gsm8k.items()}
  assert sum(len(q) for q in questions.values()) == 5231 + 2242 + 1319  # no duplicates
  assert not questions["train"] & questions["holdout"]
  assert not (questions["train"] | questions["holdout"]) & questions["test"]
  # train + holdout is the whole train file, in the seeded permutation's order.
  train_rows = _read_jsonl(os.path.join(GSM8K_DIR, "train.jsonl"))
  order = np.random.default_rng(data.DEFAULT_SEED).permutation(len(train_rows))
  indices = [e.source_index for e in gsm8k["train"] + gsm8k["holdout"]]
  assert indices == order.tolist()
  assert all(train_rows[e.source_index]["question"] == e.problem for e in gsm8k["holdout"])
  # The shuffle is applied: the split is not the file's first 70% (the reference's defect).
  train_idx = [e.source_index for e in gsm8k["train"]]
  assert max(train_idx) > 5231 + 1000 and min(e.source_index for e in gsm8k["holdout"]) < 1000
  assert train_idx != sorted(train_idx)
  # The test split is the test file in order; `answer` is the "####" number without commas.
  test_rows = _read_jsonl(os.path.join(GSM8K_DIR, "test.jsonl"))
  assert [e.problem for e in gsm8k["test"]] == [r["question"] for r in test_rows]
  assert [e.answer for e in gsm8k["test"]] == [
      r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in test_rows]


@needs_gsm8k
def test_gsm8k_builds_are_deterministic_and_seeded(gsm8k, tmp_path):
  again = data.load_split("gsm8k", "train", manual_dir=GSM8K_DIR, data_dir=tmp_path / "a")
  assert again == gsm8k["train"]
  other = data.load_split("gsm8k", "train", manual_dir=GSM8K_DIR, data_dir=tmp_path / "b", seed=1)
  assert len(other) == 5231
  assert {e.source_index for e in other} != {e.source_index for e in gsm8k["train"]}
  # No platinum file in the folder: no platinum split, and a clear error asking for it.
  with pytest.raises(ValueError, match="no split 'platinum'"):
    data.load_split("gsm8k", "platinum", data_dir=tmp_path / "a")


@needs_gsm8k
def test_gsm8k_platinum_split_from_a_manual_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in ("train.jsonl", "test.jsonl"):
    os.symlink(os.path.join(os.path.abspath(GSM8K_DIR), f), manual / f)
  rows = _read_jsonl(os.path.join(GSM8K_DIR, "test.jsonl"))[:5]
  _write_jsonl(str(manual / "platinum_test.jsonl"), rows)  # stands in for the parquet file
  platinum = data.load_split("gsm8k", "platinum", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert [e.problem for e in platinum] == [r["question"] for r in rows]


def _math_manual_dir(root):
  """The fixture problems laid out as EleutherAI/hendrycks_math: train as parquet, test as
  jsonl (the accepted stand-in)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = _read_jsonl(os.path.join(FIXTURES, "math_problems.jsonl"))
  for subject in builders.MATH_SUBJECTS:
    train = [dict(r, type=r["subject"]) for r in rows
             if r["subject"] == subject and r["split"] == "train"]
    test = [dict(r, type=r["subject"]) for r in rows
            if r["subject"] == subject and r["split"] == "test"]
    os.makedirs(root / subject, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train), root / subject / "train-00000-of-00001.parquet")
    _write_jsonl(str(root / subject / "test-00000-of-00001.jsonl"), test)
  return rows


def test_math_builder_pools_subjects_and_splits(tmp_path):
  rows = _math_manual_dir(tmp_path / "manual")
  load = lambda name, split: data.load_split(name, split, manual_dir=tmp_path / "manual",
                                             data_dir=tmp_path / "tfds")
  train, holdout, test = load("math", "train"), load("math", "holdout"), load("math", "test")
  n_train = sum(r["split"] == "train" for r in rows)
  assert (len(train), len(holdout)) == (int(0.7 * n_train), n_train - int(0.7 * n_train))
  assert len(test) == len(rows) - n_train
  assert not {e.problem for e in train} & {e.problem for e in holdout}
  # The reference's name parsing broke on "hendrycks_math"; here it is an alias.
  assert load("hendrycks_math", "train") == train
  by_problem = {r["problem"]: r for r in rows}
  for e in train + holdout + test:
    assert e.solution == by_problem[e.problem]["solution"]
    assert e.answer == grading.last_boxed(e.solution) and e.answer
  assert {e.answer for e in train + holdout} >= {"\\frac{1}{2}", "\\sqrt{2}", "(-2, 2)"}
  assert all(grading.is_correct("math", e.solution, e.solution) for e in train + test)


def test_mmlu_builder_renders_lettered_choices(tmp_path):
  manual = tmp_path / "manual" / "all"
  manual.mkdir(parents=True)
  shutil.copy(os.path.join(FIXTURES, "mmlu_auxiliary_train.jsonl"),
              manual / "auxiliary_train-00000-of-00001.jsonl")
  shutil.copy(os.path.join(FIXTURES, "mmlu_test.jsonl"), manual / "test-00000-of-00001.jsonl")
  load = lambda split: data.load_split("mmlu", split, manual_dir=tmp_path / "manual",
                                       data_dir=tmp_path / "tfds")
  train, holdout, test = load("train"), load("holdout"), load("test")
  assert (len(train), len(holdout), len(test)) == (7, 3, 4)
  assert test[0].problem == "What is 7 times 8?\nA. 54\nB. 56\nC. 58\nD. 64"
  assert [e.solution for e in test] == ["\\boxed{B}", "\\boxed{C}", "\\boxed{A}", "\\boxed{D}"]
  assert [e.answer for e in test] == ["B", "C", "A", "D"]
  nested = [e for e in train + holdout if e.problem.startswith("Which shape")]
  assert nested and nested[0].answer == "B"  # the old nested auxiliary_train row format
  assert grading.is_correct("mmlu", test[0].solution, "So 7 * 8 = 56, the answer is (B).")
  assert not grading.is_correct("mmlu", test[0].solution, "\\boxed{A}")


@pytest.mark.parametrize("name, expected", [("gsm8k", "train.jsonl"),
                                            ("math", "algebra/train-00000-of-00001.parquet"),
                                            ("mmlu", "all/test-00000-of-00001.parquet")])
def test_offline_without_files_fails_fast(name, expected, tmp_path, monkeypatch):
  monkeypatch.setenv("ANTIDISTILL_OFFLINE", "1")

  def probe(host):
    raise AssertionError(f"probed {host} although ANTIDISTILL_OFFLINE is set")

  monkeypatch.setattr(builders, "_reachable", probe)
  start = time.monotonic()
  with pytest.raises(builders.MissingDataError, match="there is no network") as e:
    data.load_split(name, "train", data_dir=tmp_path)
  assert time.monotonic() - start < 10
  folder = os.path.join(str(tmp_path), "downloads", "manual")
  assert os.path.join(folder, expected) in str(e.value)
  # The builder used directly through TFDS fails the same way, from inside tfds.
  builder = builders.BUILDERS[name](data_dir=str(tmp_path / "direct"))
  with pytest.raises(builders.MissingDataError, match="there is no network"):
    builder.download_and_prepare(file_format="array_record")
  assert time.monotonic() - start < 10


def test_explicit_manual_dir_never_downloads(tmp_path, monkeypatch):
  for var in builders.OFFLINE_ENV:
    monkeypatch.delenv(var, raising=False)

  def no_network(urls):
    raise AssertionError("a network probe with an explicit manual_dir")

  monkeypatch.setattr(builders, "online", no_network)
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "train.jsonl").write_text("")
  with pytest.raises(builders.MissingDataError, match="manual_dir was given") as e:
    data.load_split("gsm8k", "test", manual_dir=tmp_path / "manual", data_dir=tmp_path)
  assert str(tmp_path / "manual" / "test.jsonl") in str(e.value)


def test_jsonl_dataset(tmp_path):
  path = str(tmp_path / "custom.jsonl")
  rows = [{"problem": f"What is {i} + {i}?", "solution": f"It is \\boxed{{{2 * i}}}."}
          for i in range(10)]
  rows += [{"question": "What is 10 + 5?", "answer": "10 + 5 = 15\n#### 15"}]
  _write_jsonl(path, rows)
  everything = data.load_split(f"jsonl:{path}", "all")
  assert [e.problem for e in everything] == [r.get("problem", r.get("question")) for r in rows]
  assert everything[3].answer == "6" and everything[-1].answer == "15"
  assert everything[-1].solution == rows[-1]["answer"]
  train, holdout = (data.load_split(f"jsonl:{path}", s) for s in ("train", "holdout"))
  assert (len(train), len(holdout)) == (7, 4)
  assert sorted(e.source_index for e in train + holdout) == list(range(11))
  assert grading.is_correct(f"jsonl:{path}", everything[3].solution, "\\boxed{6}")
  with pytest.raises(ValueError, match="expected all, train or holdout"):
    data.load_split(f"jsonl:{path}", "test")
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_split("gsm9k", "train")
  # The loader's aliases are grading's whole-dataset ones; a split's name is no loader name.
  assert data.ALIASES == {"hendrycks_math": "math", "competition_math": "math"}
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_split("gsm8k_platinum", "test")


def test_build_prompts_drops_and_counts_long_prompts(tokenizer):
  examples = [data.Example("What is 2 + 3?", "#### 5", "5"),
              data.Example("Natalia sold clips. " * 40 + "How many?", "#### 1", "1"),
              {"problem": "  What is 48 / 2?  ", "solution": "#### 24"}]
  short = max(len(prompt_ids(tokenizer, prompts.user_message(examples[i]["problem"]
                                                              if i == 2 else examples[i].problem),
                             system=prompts.SYSTEM_PROMPT)) for i in (0, 2))
  built = prompts.build_prompts(tokenizer, examples, max_prompt_length=short)
  assert built.indices == [0, 2] and built.dropped == 1
  assert built.ids[1] == prompt_ids(tokenizer, "What is 48 / 2?\n", system=prompts.SYSTEM_PROMPT)
  text = tokenizer.decode(built.ids[0])
  assert text.startswith("<|im_start|>system\nYou are a math teacher.")
  assert "<|im_start|>user\nWhat is 2 + 3?\n<|im_end|>" in text
  ids, indices, dropped = prompts.build_prompts(tokenizer, examples, 10_000, system=None)
  assert indices == [0, 1, 2] and dropped == 0
  assert "system" not in tokenizer.decode(ids[0])
