"""configs/: one schema (configs/base.py) for every config, the README's command-line overrides
on each, and the authors' prompt layout as the paper configs render it through real chat
templates (PAPER.md, "Prompt layout").

Leaf types: a config's leaf has the type of base.py's, except the fields base.py documents as
taking None (NONE_ALLOWED), where either side may be None.
"""

import dataclasses
import glob
import os
import re
import runpy

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(CONFIGS, "*.py")) if not p.endswith("__init__.py"))
EXPERIMENTS = ("tiny", "synthetic", "quick", "gsm8k_paper", "math_paper", "mmlu_paper")
STUDIES = ("synthetic_study", "matrix")
PAPER = ("gsm8k_paper", "math_paper", "mmlu_paper")
NONE_ALLOWED = {"sample.top_p", "sample.top_k", "distill.lora_rank", "report.student_sd"}
SEEDS = ("seed", "data.seed", "tiny.seed", "scratch.seed", "sample.seed", "distill.seed",
         "attacks.seed")
# The authors' SYSTEM_PROMPT as PAPER.md gives it (two Python string pieces, concatenated).
AUTHORS_SYSTEM_PROMPT = (
    "You are a math teacher. You will be given a math problem and you will solve it step by step.\n"
    "You will output your final solution like \\boxed{ANSWER}. Be sure to include relevant units "
    "within the brackets and fully evaluate arithmetic expressions.\n")


def config_path(name: str) -> str:
  return os.path.join(CONFIGS, f"{name}.py")


def load(name: str):
  return runpy.run_path(config_path(name))["get_config"]()


def leaves(tree: dict, prefix: str = "") -> dict:
  """{"a.b.c": value} of a nested dict (an empty sub-dict is a leaf: it has no keys)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(leaves(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def get(config, path: str):
  for key in path.split("."):
    config = config[key]
  return config


def test_every_config_file_is_listed():
  assert set(EXPERIMENTS) | set(STUDIES) | {"base", "generate"} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_has_the_base_tree(name):
  base = leaves(load("base").to_dict())
  config = load(name)
  mine = leaves(config.to_dict())
  assert sorted(set(mine) - set(base)) == [] and sorted(set(base) - set(mine)) == []
  for path, value in mine.items():
    if path in NONE_ALLOWED and (value is None or base[path] is None):
      continue
    assert type(value) is type(base[path]), (path, value, base[path])
  assert config.is_locked  # values only: a new key raises
  with pytest.raises(AttributeError):
    config.sample.temperature = 1.0


def test_base_distill_is_distill_config():
  from antidistill_jax import distill
  defaults = {f.name: f.default for f in dataclasses.fields(distill.DistillConfig)}
  assert load("base").distill.to_dict() == defaults


def test_the_system_prompt_is_the_authors():
  from antidistill_jax.data import prompts
  base = runpy.run_path(config_path("base"))
  assert base["SYSTEM_PROMPT"] == prompts.SYSTEM_PROMPT == AUTHORS_SYSTEM_PROMPT
  for name in PAPER + ("generate",):
    assert load(name).prompts.system == AUTHORS_SYSTEM_PROMPT, name
  for name in ("tiny", "synthetic", "quick") + STUDIES:  # departures, each saying why in its config
    assert load(name).prompts.system == "", name


def test_the_job_dispatch():
  assert load("generate").job == "generate"
  assert all(load(name).job == "experiment" for name in EXPERIMENTS)
  assert all(load(name).job == "study" for name in STUDIES)


def test_every_arm_of_a_study_has_the_base_tree_and_names_itself():
  base = leaves(load("base").to_dict())
  for name in STUDIES:
    module = runpy.run_path(config_path(name))
    get_config = module["get_config"]
    for arm in module.get("ARMS", get_config().study.arms):
      config = get_config(arm)
      assert set(leaves(config.to_dict())) == set(base), (name, arm)
      assert config.study.arm == arm and config.job == "study"
    with pytest.raises(ValueError, match="unknown arm"):
      get_config("no_such_arm")


def test_the_main_job_is_a_reduced_chain_of_the_studys_arm():
  """configs/quick.py (the README's main job) differs from its study arm only in the grid, the
  report's noise figure and the study fields: its task, models, g, sampling, training and
  evaluation are the arm's, so the study's student noise applies to it (and a workdir that
  holds the study reuses its models and g)."""
  import json
  quick = load("quick")
  arm = runpy.run_path(config_path("synthetic_study"))["get_config"]("free_writing")
  a, b = leaves(quick.to_dict()), leaves(arm.to_dict())
  differ = sorted(k for k in a if a[k] != b[k])
  assert differ and all(k.split(".")[0] in ("grid", "report", "study", "job") for k in differ), differ
  assert quick.grid.temperatures == (1.0, 1.6) and quick.grid.calibrate.points == 1
  # Its noise figure is the committed study's, for this arm (to half a point: update it with
  # the study's results).
  with open(os.path.join(ROOT, "docs", "synthetic", "study", "results.json")) as f:
    measured = json.load(f)["between_students"]["by_arm"]["free_writing"]["sd"]
  assert abs(quick.report.student_sd - measured) <= 0.005, (quick.report.student_sd, measured)


def test_the_matrix_reuses_the_studys_free_writing_chains(tmp_path):
  """configs/matrix.py's chain at a seed has the study's free_writing chain's keys for what
  they share (models, holdout, g, calibration, the plain and control trace sets, their passive
  students): run in the study's workdir, it computes only its defences and attackers."""
  from antidistill_jax import pipeline, study
  matrix = study.chain_config(study.file_loader(config_path("matrix")), study.Chain("matrix", 1))
  arm = study.chain_config(study.file_loader(config_path("synthetic_study")),
                           study.Chain("free_writing", 1))
  m, a = (pipeline.Experiment(c, str(tmp_path)) for c in (matrix, arm))
  for key in ("models_key", "holdout_key", "grad_key", "calibrate_key", "eval_base_key"):
    assert getattr(m, key)() == getattr(a, key)(), key
  shared = pipeline.grid(arm, [])  # every point but ADS (their lams are calibrated)
  assert {p.kind for p in shared} == {"temperature", "control"}
  assert set(shared) < set(pipeline.grid(matrix, []))
  for p in shared:
    assert m.sample_key(p) == a.sample_key(p)
  passive = lambda x: sorted(x.distill_key(s) for s in x.students(shared) if s.attack is None)
  assert passive(m) == passive(a) and len(passive(a)) == 2 * len(shared)
  # Attackers only on defence and temperature points, one student each.
  attacked = [s for s in m.students(shared) if s.attack]
  assert attacked and all(s.point.kind == "temperature" and s.replicate == 0 for s in attacked)
  assert m.config.grid.aligned and m.config.study.matrix


def test_the_gsm8k_matrix_is_the_paper_setup_with_the_matrix_grid():
  """configs/matrix.py:gsm8k_paper runs the paper's GSM8K models, prompts, sampling and
  distillation unchanged (so its trace sets and students are the paper config's under its
  keys); only the grid, the attackers and the study differ, and the attackers reach every
  defence and temperature point, the prefill attacker with its text."""
  from antidistill_jax import pipeline, study
  c = study.chain_config(study.file_loader(config_path("matrix")), study.Chain("gsm8k_paper", 2))
  paper = load("gsm8k_paper")
  paper.seed = 2
  a, b = leaves(c.to_dict()), leaves(paper.to_dict())
  differ = sorted(k for k in a if a[k] != b[k])
  assert all(k.split(".")[0] in ("grid", "attacks", "study", "job", "pipeline") for k in differ), differ
  x, p = pipeline.Experiment(c, "/nonexistent"), pipeline.Experiment(paper, "/nonexistent")
  plain = pipeline.Point("temperature", 1.0, 0.0, 1e-2)
  assert x.point_params(plain) == p.point_params(plain)
  assert x.distill_config() == p.distill_config()
  points = pipeline.grid(c, [0.01, 0.05, 0.1], [0.02, 0.06, 0.12])
  kinds = {k: [q for q in points if q.kind == k] for k in ("ads", "aligned", "poe", "control")}
  assert [len(v) for v in kinds.values()] == [3, 3, 2, 2]
  poe = x.point_params(kinds["poe"][0])
  assert (poe.method, poe.tau, poe.top_p, poe.top_k) == ("poe", 0.6, 0.95, 50)
  assert 0.6 in c.grid.temperatures  # the product of experts' tau is on the curve it is matched on
  attacked = {s.attack for s in x.students(points) if s.attack}
  assert attacked == set(c.attacks.names) and "prefill" in attacked and x.prefill == "Okay"
  budgets = sorted(a for a in attacked if a.startswith("resample"))
  assert budgets == ["resample@1", "resample@1.5", "resample@2", "resample@4"]
  assert not any(s.attack for s in x.students(kinds["control"]))
  assert c.study.arms == ("gsm8k_paper",) and c.study.matrix


# -- the command line --------------------------------------------------------------------------


def parse(name: str, *overrides: str):
  """The config as `python -m antidistill_jax.main --config=FILE OVERRIDES` gets it."""
  argv = ["main", f"--config={config_path(name)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# Placeholders the README writes in place of a value.
PLACEHOLDERS = {"S": "1"}


def readme_overrides() -> list[tuple[str, str]]:
  """Every `--config.PATH=VALUE` the README shows (the generic `--config.key=value` aside)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    found = re.findall(r"--config\.([A-Za-z_][\w.]*)=([^\s`]+)", f.read())
  found = [(path, PLACEHOLDERS.get(value, value)) for path, value in found if path != "key"]
  return list(dict.fromkeys(found))


def test_the_readme_shows_overrides():
  assert len(readme_overrides()) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_each_readme_override_applies(name):
  for path, value in readme_overrides():
    config = parse(name, f"--config.{path}={value}")
    got = get(config, path)
    if isinstance(got, tuple):  # --config.attacks.names=a,b,c: the pipeline splits on commas
      assert [n for x in got for n in str(x).split(",")] == value.split(","), (path, got)
    elif isinstance(got, str):
      assert got == value, (path, got)
    else:
      assert got == type(got)(value), (path, got)


@pytest.mark.parametrize("name", NAMES)
def test_one_seed_sets_every_seed(name):
  config = parse(name, "--config.seed=3")
  assert [get(config, path) for path in SEEDS] == [3] * len(SEEDS)


# -- the rendered prompt -----------------------------------------------------------------------

TEMPLATES = os.path.join(ROOT, "tests", "fixtures", "chat_templates")
# A GSM8K train problem with the stray whitespace the authors' problem.strip() removes.
PROBLEM = ("  Natalia sold clips to 48 of her friends in April, and then she sold half as many "
           "clips in May. How many clips did Natalia sell altogether in April and May?\n\n")
QUESTION = PROBLEM.strip()
S = AUTHORS_SYSTEM_PROMPT
# The chat templates, verbatim from the models' tokenizer_config.json (copies in
# guidance-ai/guidance, guidance/chat.py, and DeepSeek's current revision):
#   qwen2_5.jinja                   Qwen/Qwen2.5-0.5B (the Qwen2.5 base models', as the proxy's)
#   llama3_2.jinja                  meta-llama/Llama-3.2 (the student's family): it trims every
#                                   turn, so the user turn's "\n" and the prompt's last "\n" go,
#                                   and dates the system turn (strftime_now: today)
#   deepseek_r1_distill_qwen.jinja  deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, the teacher: the
#                                   system prompt goes first with no role header
# (template, bos token, special tokens, the exact prompt for S and PROBLEM).
CASES = {
    "qwen2": ("qwen2_5.jinja", None, ["<|im_start|>", "<|im_end|>"],
              f"<|im_start|>system\n{S}<|im_end|>\n"
              f"<|im_start|>user\n{QUESTION}\n<|im_end|>\n"
              "<|im_start|>assistant\n"),
    "llama3": ("llama3_2.jinja", "<|begin_of_text|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
               "Cutting Knowledge Date: December 2023\nToday Date: DD Mon YYYY\n\n"
               f"{S.strip()}<|eot_id|>"
               f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "deepseek_r1": ("deepseek_r1_distill_qwen.jinja", "<｜begin▁of▁sentence｜>",
                    ["<｜User｜>", "<｜Assistant｜>", "<think>"],
                    f"<｜begin▁of▁sentence｜>{S}<｜User｜>{QUESTION}\n<｜Assistant｜><think>\n"),
}


def chat_tokenizer(template_file: str, bos: str | None, special: list[str]):
  """A small byte-level BPE (offline) with a real model's chat template and special tokens."""
  from antidistill_jax import random_checkpoints
  corpus = [S, PROBLEM, "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2026\n"]
  tokenizer = random_checkpoints.train_tokenizer(corpus * 4, vocab_size=600)
  tokens = dict(additional_special_tokens=special)
  if bos:
    tokens["bos_token"] = bos
  tokenizer.add_special_tokens(tokens)
  with open(os.path.join(TEMPLATES, template_file), encoding="utf-8") as f:
    tokenizer.chat_template = f.read()
  return tokenizer


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("family", sorted(CASES))
def test_the_paper_configs_render_the_authors_prompt(family, name):
  from antidistill_jax import distill
  from antidistill_jax.data.prompts import build_prompts
  from antidistill_jax.data.records import Example
  template, bos, special, expected = CASES[family]
  tokenizer = chat_tokenizer(template, bos, special)
  c = load(name)
  system = c.prompts.system or None  # as the pipeline passes it (Experiment._trace_settings)
  example = Example(problem=PROBLEM, solution="72", answer="72")
  prompts = build_prompts(tokenizer, [example], c.prompts.max_prompt_length, system=system)
  assert prompts.indices == [0] and prompts.dropped == 0
  text = tokenizer.decode(prompts.ids[0], skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)
  text = re.sub(r"Today Date: \d{2} \w{3} \d{4}", "Today Date: DD Mon YYYY", text)
  assert text == expected
  # The student's distillation examples open with the same (system, user) prompt.
  (prompt, _), = distill.sft_examples(tokenizer, [dict(problem=PROBLEM, completion=" 72")],
                                      system=system, max_length=4096)
  assert prompt == prompts.ids[0]
