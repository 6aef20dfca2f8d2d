"""Inputs that need no work are checked before any stage runs (`Inputs.preflight`): a missing
split, a missing checkpoint, a proxy of another vocabulary, a tokenizer without a chat template
each fail in seconds, naming the flag and the fix, with no stage output written."""

import json
import os
import time

import pytest

from antidistill_jax import errors, pipeline, random_checkpoints
from configs import gsm8k_paper, tiny as tiny_config


def gsm8k_manual_dir(root, n_train=12, n_test=4):
  """GSM8K's two source files (question / answer "... #### N"), a few rows each; no
  platinum_test file."""
  os.makedirs(root)
  for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
    with open(os.path.join(root, name), "w") as f:
      for i in range(n):
        f.write(json.dumps(dict(question=f"What is {i} + 1?", answer=f"{i} + 1 = {i + 1}\n"
                                f"#### {i + 1}")) + "\n")
  return root


def stage_outputs(workdir):
  return sorted(p for p in os.listdir(workdir) if p in pipeline.STAGES or p == "records")


def test_the_paper_config_without_its_test_split_fails_at_once(tmp_path):
  c = gsm8k_paper.get_config()
  c.data.manual_dir = gsm8k_manual_dir(str(tmp_path / "manual"))
  c.data.data_dir = str(tmp_path / "tfds")
  workdir = tmp_path / "run"
  start = time.time()
  with pytest.raises(errors.MissingInput) as e:
    pipeline.Experiment(c, str(workdir)).run()
  assert time.time() - start < 60
  message = str(e.value)
  assert "--config.data.test=gsm8k:platinum" in message and "has no split 'platinum'" in message
  assert "--config.data.test=gsm8k:test" in message  # the fix
  assert stage_outputs(workdir) == []
  # the same run with the split the fix names gets past the data to the checkpoints
  c.data.test = "gsm8k:test"
  with pytest.raises(errors.MissingInput, match="--config.models.teacher"):
    pipeline.Experiment(c, str(workdir)).run()
  assert stage_outputs(workdir) == []


def checkpoints(tmp_path, proxy_vocab=None, template=True):
  c = tiny_config.get_config()
  c.tiny.enabled = False
  paths = {}
  tok = None
  for i, role in enumerate(("teacher", "proxy", "student")):
    path = str(tmp_path / role)
    kw = dict(seed=i, hidden_size=32, intermediate_size=64)
    if role == "proxy" and proxy_vocab:  # a tokenizer of its own: another vocabulary
      kw["tokenizer"] = random_checkpoints.train_tokenizer(vocab_size=proxy_vocab)
    elif tok is not None:
      kw["tokenizer"] = tok
    random_checkpoints.make_tiny_checkpoint(path, **kw)
    if tok is None:
      from antidistill_jax import tokenizer as tok_lib
      tok = tok_lib.load_tokenizer(path)
    paths[role] = path
  if not template:
    config_path = os.path.join(paths["student"], "tokenizer_config.json")
    cfg = json.load(open(config_path))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(config_path, "w"))
    template_file = os.path.join(paths["student"], "chat_template.jinja")
    if os.path.exists(template_file):
      os.remove(template_file)
  c.models.update(paths)
  return c


@pytest.mark.parametrize("stages", [None, ("grad",)])  # g alone reads the teacher's traces
def test_a_proxy_of_another_vocabulary_fails_before_any_stage(tmp_path, stages):
  c = checkpoints(tmp_path, proxy_vocab=300)
  with pytest.raises(errors.BadValue, match="different vocabularies.*--config.models.proxy"):
    pipeline.Experiment(c, str(tmp_path / "run")).run(stages or pipeline.STAGES)
  assert stage_outputs(tmp_path / "run") == []


def test_a_student_without_a_chat_template_fails_before_any_stage(tmp_path):
  c = checkpoints(tmp_path, template=False)
  with pytest.raises(errors.BadValue, match="student tokenizer .* has no chat template"):
    pipeline.Experiment(c, str(tmp_path / "run")).run()
  assert stage_outputs(tmp_path / "run") == []


@pytest.mark.parametrize("remove, problem", [("config.json", "No config.json"),
                                              ("model.safetensors", "No model.safetensors")])
def test_a_student_folder_that_is_no_model_fails_before_any_stage(tmp_path, remove, problem):
  """The student is first loaded at the distill stage, hours in: its folder is checked first."""
  c = checkpoints(tmp_path)
  os.remove(os.path.join(c.models.student, remove))
  with pytest.raises(errors.MissingInput) as e:
    pipeline.Experiment(c, str(tmp_path / "run")).run()
  message = str(e.value)
  assert message.startswith(f"--config.models.student={c.models.student}: ")
  assert problem in message and "Pass a Hugging Face model folder" in message
  assert stage_outputs(tmp_path / "run") == []


def test_a_missing_path_names_its_own_role_and_is_not_taken_for_a_hub_id(tmp_path):
  c = checkpoints(tmp_path)
  c.models.proxy = "runs/no/such/proxy"  # relative, more than ORG/NAME: a path, not a hub id
  with pytest.raises(errors.MissingInput, match="model directory 'runs/no/such/proxy' does not "
                     r"exist: .* \(--config.models.proxy=DIR\)"):
    pipeline.Experiment(c, str(tmp_path / "run")).run()


@pytest.mark.parametrize("field, value, named", [
    ("sample.top_p", 1.5, "top_p=1.5 must be in (0, 1]"),
    ("distill.micro_batch_size", 3, "not a multiple of micro_batch_size=3"),
    ("grid.poe_gammas", (1.5,), "lam=1.5 with method='poe'"),
])
def test_a_setting_out_of_range_fails_before_any_stage(tmp_path, field, value, named):
  """Each sampler's and the distiller's settings are built in the preflight: a value out of
  range names itself and the config group to fix, and no stage writes anything."""
  c = tiny_config.get_config()
  group, key = field.split(".")
  c[group][key] = value
  if key == "poe_gammas":
    c.grid.poe_taus = (1.0,)
  workdir = tmp_path / "run"
  with pytest.raises(errors.BadValue) as e:
    pipeline.Experiment(c, str(workdir)).run()
  assert named in str(e.value) and f"--config.{group}.<field>" in str(e.value)
  assert stage_outputs(workdir) == []


def test_a_jsonl_file_is_a_split_and_an_empty_one_names_itself(tmp_path):
  """data.<which> = jsonl:PATH (every row) or jsonl:PATH:train / :holdout (its seeded 70/30
  split); a file with no rows fails before any stage, naming the flag and where to look."""
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps(dict(problem=f"{i} + 1?", solution=f"{i + 1}")) + "\n"
                          for i in range(10)))
  c = tiny_config.get_config()
  loaded = {s: pipeline.inputs.load_examples(c.data, f"jsonl:{rows}{s}", "--config.data.test")
            for s in ("", ":all", ":train", ":holdout")}
  assert [e.problem for e in loaded[""]] == [f"{i} + 1?" for i in range(10)] and \
      loaded[":all"] == loaded[""]
  assert (len(loaded[":train"]), len(loaded[":holdout"])) == (7, 3)
  assert {e.problem for e in loaded[":train"] + loaded[":holdout"]} == {
      e.problem for e in loaded[""]}
  with pytest.raises(errors.BadValue, match="expected DATASET:SPLIT"):
    pipeline.inputs.load_examples(c.data, "gsm8k:train:x", "--config.data.test")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  c.data.test = f"jsonl:{empty}"
  workdir = tmp_path / "run"
  with pytest.raises(errors.BadValue) as e:
    pipeline.Experiment(c, str(workdir)).run()
  assert str(e.value) == (f"--config.data.test=jsonl:{empty}: the split has no examples "
                          f"(--config.data.max_test={c.data.max_test}); name a split that has "
                          "some, or check its source files (--config.data.manual_dir).")
  assert stage_outputs(workdir) == []
