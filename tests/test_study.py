"""The study's instrument: replicate students with common random numbers, the A/A control
sweep, g's traces apart from the NLL traces, the index's means over replicates, and the
study's report (per-seed gaps, CIs, the A/A row, seeds counted per value). The run itself at
reduced size is test_a_study_runs_its_chains_and_shares_what_arms_share."""

import json
import os

import pytest

from antidistill_jax import distill, errors, pipeline, study
from antidistill_jax.pipeline import reporting, teacher
from configs import tiny as tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**grid):
  c = tiny_config.get_config()
  c.grid.update(grid)
  return c


def test_the_control_sweep_is_plain_sampling_from_another_stream(tmp_path):
  x = pipeline.Experiment(tiny(controls=(1.0,)), str(tmp_path))
  points = pipeline.grid(x.config)
  control = [p for p in points if p.kind == "control"]
  plain = next(p for p in points if p.kind == "temperature" and p.tau == 1.0)
  assert len(control) == 1 and control[0].lam == 0.0 and control[0].stream == 1
  assert len({p.name for p in points}) == len(points)
  assert x.point_params(control[0]).seed != x.point_params(plain).seed
  assert x.sample_key(control[0]) != x.sample_key(plain)  # other traces
  # every other setting is the temperature point's
  assert (dict(x.point_params(control[0]).as_dict(), seed=0)
          == dict(x.point_params(plain).as_dict(), seed=0))


def test_replicates_are_keyed_apart_and_share_seeds_across_trace_sets(tmp_path):
  one = pipeline.Experiment(tiny(), str(tmp_path))
  two = pipeline.Experiment(tiny(students=2), str(tmp_path))
  points = pipeline.grid(one.config)
  students = two.students(points)
  assert [s.replicate for s in students] == [0] * len(points) + [1] * len(points)
  assert [s.point for s in students] == points * 2
  # replicate 0 is the student of a single-student config: finished workdirs keep theirs
  assert [one.distill_key(s) for s in one.students(points)] == [
      two.distill_key(s) for s in students[:len(points)]]
  assert len({two.distill_key(s) for s in students}) == len(students)
  assert len({two.eval_student_key(s) for s in students}) == len(students)
  # common random numbers: replicate r has one seed, so one data order, on every trace set
  seeds = {two.distill_config(s.replicate).seed for s in students if s.replicate == 1}
  assert len(seeds) == 1 and seeds != {two.distill_config(0).seed}
  cfg = two.distill_config(1)
  assert all((distill.batch_indices(300, cfg, step) ==
              distill.batch_indices(300, two.distill_config(1), step)).all() for step in range(5))
  assert students[len(points)].name == points[0].name + "_r1"
  assert students[len(points)].entry == points[0].name


def test_g_and_the_students_nll_read_disjoint_holdout_traces(tmp_path, monkeypatch):
  rows = [dict(problem=str(i)) for i in range(10)]
  monkeypatch.setattr(teacher, "holdout_rows", lambda x: rows)
  config = tiny()
  x = pipeline.Experiment(config, str(tmp_path))
  assert teacher.grad_rows(x) == rows and teacher.nll_rows(x) == rows  # grad.rows 0: all, twice
  key = x.grad_key()
  config.grad.rows = 6
  x = pipeline.Experiment(config, str(tmp_path))
  assert teacher.grad_rows(x) == rows[:6] and teacher.nll_rows(x) == rows[6:]
  assert x.grad_key() != key
  config.grad.rows = 10
  with pytest.raises(errors.BadValue, match="grad.rows=10 leaves none"):
    teacher.nll_rows(pipeline.Experiment(config, str(tmp_path)))


def test_g_from_sampled_traces_changes_g_and_the_ads_sets_only(tmp_path):
  greedy = pipeline.Experiment(tiny(), str(tmp_path))
  config = tiny()
  config.grad.tau = 1.0
  sampled = pipeline.Experiment(config, str(tmp_path))
  assert sampled.grad_key() != greedy.grad_key()
  assert sampled.holdout_key() == greedy.holdout_key()  # the NLL's traces stay greedy
  for p in pipeline.grid(config):
    same = p.kind != "ads"
    assert (sampled.sample_key(p) == greedy.sample_key(p)) == same
    s = pipeline.Student(p)
    assert (sampled.distill_key(s) == greedy.distill_key(s)) == same


def _publish(x, stage, key, metrics):
  x.store.publish(stage, key, dict(seconds=0.0, metrics=metrics))


def test_the_index_holds_each_points_students_and_their_mean(tmp_path):
  x = pipeline.Experiment(tiny(students=2, controls=(1.5,)), str(tmp_path))
  x.store.open()
  points = pipeline.grid(x.config)
  accuracy = {}
  for i, s in enumerate(x.students(points)):
    if s.point.kind == "ads" and s.replicate == 1:
      continue  # unfinished: the ADS point has one student so far
    accuracy[s.name] = 0.1 * (i + 1)
    _publish(x, "distill", x.distill_key(s), dict(holdout_loss=float(i), train_loss=1.0))
    _publish(x, "eval_student", x.eval_student_key(s), dict(accuracy=accuracy[s.name], n=16))
  entries = reporting.entries(x)
  assert sorted(entries) == sorted(p.name for p in points)
  for p in points:
    e = entries[p.name]
    reps = [accuracy[n] for n in (p.name, p.name + "_r1") if n in accuracy]
    assert e["student_eval"]["n_students"] == len(reps) == len(e["students"]) - (p.kind == "ads")
    assert e["student_eval"]["accuracy"] == pytest.approx(sum(reps) / len(reps))
    assert e["distill"]["n_students"] == len(reps)
    losses = [float(i) for i, s in enumerate(x.students(points))
              if s.point == p and s.name in accuracy]
    assert e["distill"]["holdout_loss"] == pytest.approx(sum(losses) / len(losses))
  assert entries[points[0].name]["student_eval"]["n_students"] == 1  # ads, replicate 0 only


def chain_results(root, arm, seed, ads_gaps, control_gaps, teacher=0.7):
  """A finished chain's report/results.json as the report stage writes it."""
  row = lambda kind, k, gap: dict(name=f"{kind}{k}", kind=kind, tau=1.0 + k, lam=0.1 * (k + 1)
                                  if kind == "ads" else 0.0, teacher=teacher, ads_student=0.5,
                                  temperature_student=None if gap is None else 0.5 - gap,
                                  gap=gap, loss_gap=None if gap is None else 0.01,
                                  role_loss_gaps=dict(answer=0.02, writing=-0.01, reasoning=0.0))
  points = [dict(name=f"ads{k}", point=dict(kind="ads", tau=1.0, lam=0.1, eps=0.01),
                 teacher_eval=dict(accuracy=teacher),
                 students=[dict(replicate=r, student_eval=dict(accuracy=0.5 + r / 100),
                                distill=dict(holdout_loss=0.2)) for r in range(2)])
            for k in range(len(ads_gaps))]
  out = os.path.join(root, "results", arm, f"seed{seed}", "report")
  os.makedirs(out)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(dict(points=points, matched=[row("ads", k, g) for k, g in enumerate(ads_gaps)]
                   + [row("control", k, g) for k, g in enumerate(control_gaps)]), f)


def test_the_study_report_counts_the_seeds_behind_every_value(tmp_path):
  config = tiny()
  config.study.update(dict(arms=("a",), seeds=(0, 1, 2, 3)))
  chain_results(tmp_path, "a", 0, [-0.10, -0.20], [0.01])
  chain_results(tmp_path, "a", 1, [-0.05, -0.15], [-0.02])
  chain_results(tmp_path, "a", 2, [-0.10, None], [0.00])  # point 2 fell outside the sweep
  # seed 3 unfinished: no results
  rows = study.seed_rows(config, str(tmp_path))
  assert [r["seed"] for r in rows] == [0, 1, 2]
  assert rows[0]["ads_gap"] == pytest.approx(-0.15) and rows[2]["ads_gap"] is None
  summary = {(r["kind"], r["rank"]): r for r in study.results_rows(config, rows)}
  primary = summary[("ads", 0)]
  assert primary["n"] == 2 and primary["left_out"] == 1  # seed 2 lacks point 2
  assert primary["summary"]["mean"] == pytest.approx((-0.15 - 0.10) / 2)
  assert summary[("ads", 1)]["n"] == 3 and summary[("ads", 2)]["n"] == 2
  assert summary[("control", 0)]["n"] == 3
  assert summary[("control", 0)]["summary"]["mean"] == pytest.approx(-0.01 / 3)
  written = study.write_study_report(config, str(tmp_path))
  text = open(written["table"]).read()
  assert "3 of 4 chains finished; 12 students." in text
  assert "| a | ADS, mean over its 2 points | 2 (1 left out) |" in text
  assert "| a | A/A control, mean over its 1 points | 3 |" in text
  assert "| a | ADS | 3 | +0.020 [+0.020, +0.020] | -0.010 [-0.010, -0.010] |" in text
  assert os.path.getsize(written["forest"]) > 0
  assert not any(k.startswith("matrix") for k in written)
  # study.matrix: the defence x attacker matrix beside it, from the same chains.
  config.study.matrix = True
  written = study.write_study_report(config, str(tmp_path))
  matrix_text = open(written["matrix_table"]).read()
  assert "| ADS, mean over its points | 0.700 | - | 2 | -12.5 [" in matrix_text
  assert os.path.getsize(written["matrix_heatmap"]) > 0


def test_a_chain_with_fewer_ads_points_is_shown_and_its_arm_summarized_without_it(tmp_path):
  """A calibration that merged two lams leaves a chain with fewer ADS points: its G is the
  mean over the points it has; the report lists every chain's G and C, and adds the primary
  row over the chains with every point."""
  config = tiny()
  config.study.update(dict(arms=("a",), seeds=(0, 1, 2)))
  chain_results(tmp_path, "a", 0, [-0.10, -0.20], [0.01])
  chain_results(tmp_path, "a", 1, [-0.30], [0.02])  # one ADS point
  chain_results(tmp_path, "a", 2, [-0.05, -0.15], [0.00])
  rows = study.seed_rows(config, str(tmp_path))
  assert rows[1]["ads_gap"] == pytest.approx(-0.30)
  (fewer,) = study.fewer_points_rows(config, rows)
  assert fewer["n"] == 2 and fewer["summary"]["mean"] == pytest.approx((-0.15 - 0.10) / 2)
  text = open(study.write_study_report(config, str(tmp_path))["table"]).read()
  assert "| a | ADS, mean over its 2 points | 3 |" in text  # every chain counts in the primary
  assert "| a | ADS, only the chains with all 2 points | 2 | 0.700 | -12.5 |" in text
  assert "| a | 1 | 1 | -30.0 | +2.0 | +0.0100 |" in text  # the chain table
  # Every chain with all its points: no such section.
  config.study.seeds = (0, 2)
  assert "fewer ADS points" not in open(
      study.write_study_report(config, str(tmp_path))["table"]).read()


def test_an_arm_is_its_config_files_argument():
  load = study.file_loader(os.path.join(ROOT, "configs", "synthetic_study.py"),
                           {"study.seeds": (5,), "study.arm": "ignored", "grid.students": 3})
  c = study.chain_config(load, study.Chain("fixed_writing", 5))
  assert c.study.arm == "fixed_writing" and c.data.task.separators == (",",)
  assert c.seed == c.data.seed == c.sample.seed == c.distill.seed == 5
  assert c.pipeline.name == "fixed_writing/seed5" and c.job == "experiment"
  assert c.grid.students == 3  # the command line's overrides reach every arm
  free = study.chain_config(load, study.Chain("free_writing_g_tau1", 5))
  assert free.grad.tau == 1.0 and free.scratch.student.pretrain.task.order == "free"
  assert [ch.name for ch in study.chains(load("free_writing"))][:3] == [
      "fixed_writing/seed5", "free_writing/seed5", "free_writing_g_tau1/seed5"]


REDUCED = {  # configs/synthetic_study.py at a size that checks it runs, not what it finds
    "data.max_holdout": 16, "grad.rows": 8, "data.max_train": 32, "data.max_test": 16,
    "scratch.eval_rows": 8, "scratch.teacher.traces": 64, "scratch.proxy.traces": 32,
    "scratch.student.pretrain.traces": 32, "scratch.batch_size": 32,
    "scratch.teacher.train.epochs": 1, "scratch.proxy.train.epochs": 1,
    "grid.temperatures": (1.0, 2.0), "grid.controls": (1.5,), "grid.calibrate.between": (),
    "grid.calibrate.n": 16, "grid.calibrate.points": 1,
    "grid.calibrate.ladder": (0.0, 10.0, 100.0), "distill.epochs": 1, "distill.eval_every": 1,
    "study.seeds": (0,), "study.arms": ("free_writing", "free_writing_g_tau1")}


@pytest.mark.slow
def test_a_study_runs_its_chains_and_shares_what_arms_share(tmp_path):
  """Two arms that differ only in g's traces: the second chain trains only its ADS students
  (2 replicates) and reuses the models, the temperature and control students of the first."""
  load = study.file_loader(os.path.join(ROOT, "configs", "synthetic_study.py"),
                           dict(REDUCED, **{"study.records": str(tmp_path / "chains")}))
  config = load("free_writing")
  done = study.run_study(config, load, str(tmp_path))
  first, second = done["free_writing/seed0"], done["free_writing_g_tau1/seed0"]
  assert first["distill"]["computed"] == 8  # (2 temperatures + 1 control + 1 ADS) x 2
  assert second["models"]["reused"] == second["holdout"]["reused"] == 1
  assert second["grad"]["computed"] == 1 and second["distill"]["computed"] == 2
  assert second["distill"]["reused"] == 6 and second["eval_student"]["reused"] == 6
  records = pipeline.Store(str(tmp_path)).records()
  distilled = [r for r in records if r["stage"] == "distill"]
  assert sorted({r["replicate"] for r in distilled}) == [0, 1]
  # replicate 1 trains with its own seed (data order, initialisation), not replicate 0's
  losses = {}
  for r in distilled:
    point = json.dumps(r["point"], sort_keys=True)
    losses.setdefault(point, [set(), set()])[r["replicate"]].add(r["metrics"]["train_loss"])
  assert losses and all(first and second and not first & second
                        for first, second in losses.values())
  assert all(r["metrics"]["nll_by_role"] and set(r["metrics"]["nll_by_role"]) <= {
      "answer", "writing", "reasoning"} for r in distilled)  # an untrained teacher's traces
  for chain in ("free_writing/seed0", "free_writing_g_tau1/seed0"):
    res = json.loads((tmp_path / "results" / chain / "report" / "results.json").read_text())
    record = json.loads((tmp_path / "chains" / f"{chain}.json").read_text())
    assert record.pop("fingerprint") and record == res  # the chain's results, kept
  text = (tmp_path / "study" / "results.md").read_text()
  assert "2 of 2 chains finished; 16 students." in text
  assert "| free_writing_g_tau1 | A/A control, mean over its 1 points | 1 |" in text
  # The workdir lost: the records finish the study; nothing runs again.
  lost = tmp_path / "lost"
  assert study.run_study(config, load, str(lost)) == {}
  assert (lost / "study" / "results.md").read_text() == text.replace(
      "2 of 2 chains finished;", f"2 of 2 chains finished (2 of them read from their records "
      f"in {tmp_path / 'chains'});")
  config.study.records = str(lost / "records")  # the store's own folder: refused, named
  with pytest.raises(errors.BadValue, match="workdir's own folder of stage records"):
    study.run_study(config, load, str(lost))


def test_a_study_refuses_a_report_of_some_stages(tmp_path):
  """A chain's report is the study's result for it (and its record): written from some stages
  it would pass for a finished chain, so the study refuses before any work."""
  load = study.file_loader(os.path.join(ROOT, "configs", "synthetic_study.py"),
                           dict(REDUCED, **{"study.records": str(tmp_path / "chains")}))
  config = load("free_writing")
  with pytest.raises(errors.BadValue, match="would pass for a finished chain"):
    study.run_study(config, load, str(tmp_path), stages=("models", "report"))
  assert not os.listdir(tmp_path)  # nothing ran, no record


def test_a_record_is_reused_only_by_the_computation_that_made_it(tmp_path):
  """study.records: a chain's record stands in for a lost workdir only where the current code
  and config give its fingerprint; another setting of the chain, or a record of another
  chain, is left out (its chain runs again)."""
  path = os.path.join(ROOT, "configs", "synthetic_study.py")
  overrides = dict(REDUCED, **{"study.records": str(tmp_path / "records")})
  load = study.file_loader(path, overrides)
  config = load("free_writing")
  work = tmp_path / "work"
  chain_results(work, "free_writing", 0, [-0.10], [0.01])
  chain_results(work, "free_writing_g_tau1", 0, [-0.20], [0.02])
  for arm in config.study.arms:
    chain = study.Chain(arm, 0)
    x = pipeline.Experiment(study.chain_config(load, chain), str(work))
    assert study.keep_record(config, chain, x) == os.fspath(study.record_path(config, chain))
  fingerprints = {a: json.loads((tmp_path / "records" / a / "seed0.json").read_text())[
      "fingerprint"] for a in config.study.arms}
  assert len(set(fingerprints.values())) == 2  # the arms' g differ: so do their chains
  before = study.write_study_report(config, str(work))
  text = open(before["table"]).read()
  assert "2 of 2 chains finished" in text
  config.study.out = str(tmp_path / "from_records")
  kept = study.records(config, load, str(tmp_path / "lost"))
  assert sorted(kept) == ["free_writing/seed0", "free_writing_g_tau1/seed0"]
  after = study.write_study_report(config, str(tmp_path / "lost"), kept)
  assert open(after["table"]).read() == text.replace(
      "2 of 2 chains finished;", f"2 of 2 chains finished (2 of them read from their records "
      f"in {tmp_path / 'records'});")
  # Another distillation: the same chain names, other students. No record is reused.
  other = study.file_loader(path, dict(overrides, **{"distill.epochs": 2}))
  assert study.records(other("free_writing"), other, str(tmp_path / "lost")) == {}
  # A record copied under another chain's name is not that chain's.
  (tmp_path / "records" / "free_writing" / "seed0.json").write_text(
      (tmp_path / "records" / "free_writing_g_tau1" / "seed0.json").read_text())
  assert sorted(study.records(config, load, str(tmp_path / "lost"))) == [
      "free_writing_g_tau1/seed0"]


def test_the_nll_by_role_splits_the_holdout_loss(tmp_path):
  """On gold chains, with the task's byte tokenizer: every role is present, and the roles'
  token-weighted mean is the holdout loss distill reports (one NLL, split, nothing lost)."""
  from antidistill_jax import task_models
  from antidistill_jax.data import synthetic
  from antidistill_jax.pipeline import student as student_stage
  tok = task_models.task_tokenizer()
  model = task_models.random_model(tok, model_type="llama", seed=0, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
  rows = [dict(problem=e.problem, completion=e.solution, finished=True)
          for e in synthetic.chains(12, split="holdout")]
  rows[0]["completion"] += "é"  # two bytes, two tokens, one character
  examples = distill.sft_examples(tok, rows, system=None, max_length=128)
  cfg = distill.DistillConfig(lora_rank=None, micro_batch_size=5, batch_size=5,
                              length_multiple=16, pad_id=tok.pad_token_id or 0)
  roles = student_stage.nll_by_role(model, rows, examples, cfg, None)
  assert set(roles) == {"answer", "writing", "reasoning"}
  counts = {r: 0 for r in roles}
  for row in rows:
    for ch, r in zip(row["completion"], synthetic.token_roles(row["completion"])):
      counts[r] += len(ch.encode())
    counts["answer"] += 1  # EOS
  mean = sum(roles[r] * counts[r] for r in roles) / sum(counts.values())
  graphdef, *states = distill.split_student(model, cfg)
  loss = distill.evaluate_loss((graphdef, *states), examples, cfg, rows=5)
  assert mean == pytest.approx(loss, rel=1e-5)


def test_arm_contrasts_are_paired_by_seed(tmp_path):
  config = tiny()
  config.study.update(dict(arms=("a", "b"), seeds=(0, 1, 2), contrasts=(("a", "b"),)))
  for seed, (ga, gb) in enumerate([(-0.10, 0.00), (-0.20, -0.05), (-0.15, None)]):
    chain_results(tmp_path, "a", seed, [ga], [0.0])
    chain_results(tmp_path, "b", seed, [gb], [0.0])
  (row, control), = [study.contrast_rows(config, study.seed_rows(config, str(tmp_path)))]
  assert row["n"] == 2 and row["left_out"] == 1  # seed 2: b has no gap
  assert row["summary"]["mean"] == pytest.approx((-0.10 - 0.15) / 2)
  assert control["summary"]["mean"] == 0.0
  assert "## Arms against each other" in open(
      study.write_study_report(config, str(tmp_path))["table"]).read()


def test_the_seeds_table_counts_only_seeds_with_every_value():
  """report.seeds_table (docs/synthetic/seeds.md): a seed whose point fell outside the
  temperature sweep leaves the row, and the row says so; the values are the other seeds'."""
  from antidistill_jax import report
  row = lambda gap, temp: dict(kind="ads", lam=0.1, teacher=0.7, ads_student=0.5,
                               temperature_student=temp, gap=gap, loss_gap=0.01)
  text = report.seeds_table({"s0": [row(0.1, 0.4)], "s1": [row(0.3, 0.2)],
                             "s2": [row(None, None)]})
  line = next(l for l in text.splitlines() if l.startswith("| 1 |"))
  assert "| 2 (1 left out: outside the temperature sweep, or unfinished) |" in line
  assert "+0.200 ± 0.141" in line or "0.200 ± 0.141" in line  # gap over s0 and s1 only
  assert "0.300 ± 0.141" in line  # their temperature students, the same two seeds


def test_between_students_pools_the_variance_within_each_trace_set():
  """study.between_students: the SD between replicates of one trace set is the pooled
  within-set SD (sets of one student add nothing); a set two arms share counts once pooled."""
  st = lambda arm, seed, point, acc, key: dict(arm=arm, seed=seed, point=point, student=acc,
                                               distill_key=key)
  students = [st("a", 0, "p", 0.9, "k1"), st("a", 0, "p", 0.8, "k2"),
              st("a", 0, "q", 0.5, "k3"), st("a", 0, "q", 0.7, "k4"),
              st("a", 1, "p", 0.6, "k5"),  # a set of one: no variance
              st("b", 0, "q", 0.5, "k3"), st("b", 0, "q", 0.7, "k4"),  # a's set (0, q), shared
              st("b", 0, "r", None, "k6"),
              # c's set (0, q) has a's accuracies but its own students: it counts
              st("c", 0, "q", 0.5, "k7"), st("c", 0, "q", 0.7, "k8")]
  spread = study.between_students(students)
  # a: variances 0.005 and 0.02 (1 df each): pooled 0.0125; b: 0.02; pooled over sets, b's
  # (0, q) is a's and counts once, c's is another: (0.005 + 0.02 + 0.02) / 3 = 0.015.
  assert spread["by_arm"]["a"] == dict(sd=pytest.approx(0.0125 ** 0.5), sets=2)
  assert spread["by_arm"]["b"] == dict(sd=pytest.approx(0.02 ** 0.5), sets=1)
  assert spread["pooled"] == dict(sd=pytest.approx(0.015 ** 0.5), sets=3)


def test_the_plans_decision_rules_are_applied_as_written():
  """study.decision: docs/synthetic/PLAN.md's rules. A biased A/A control makes the arm
  unreliable whatever its ADS test says; otherwise p < alpha decides the sign; else nothing
  was detected. Fewer finished chains than planned is interim."""
  from antidistill_jax import stats
  s = lambda *xs: stats.summarize(list(xs), resamples=0)
  zero = s(-0.01, 0.01, 0.02, -0.02)
  low, high, flat = s(-0.10, -0.12, -0.11, -0.09), s(0.10, 0.12, 0.11, 0.09), s(-0.2, 0.1, 0.15, -0.1)
  assert study.decision(low, zero, 4, 4)["outcome"] == "poisons"
  assert study.decision(high, zero, 4, 4)["outcome"] == "helps"
  assert study.decision(flat, zero, 4, 4)["outcome"] == "none detected"
  biased = study.decision(low, s(0.05, 0.06, 0.05, 0.06), 4, 4)
  assert biased["outcome"] == "unreliable" and "excludes 0" in biased["text"]
  assert study.decision(low, None, 4, 4)["outcome"] == "no control"
  assert study.decision(s(-0.1), zero, 4, 4)["outcome"] == "too few seeds"
  early = study.decision(low, zero, 8, 4)
  assert early["interim"] and early["text"].startswith("Interim, 4 of 8 seeds")
  assert not study.decision(low, zero, 8, 8)["interim"]


def test_the_report_applies_the_decision_rules_to_the_primary_arms(tmp_path):
  config = tiny()
  config.study.update(dict(arms=("a", "b"), seeds=(0, 1, 2), primary=("a",)))
  for seed, gap in enumerate([-0.10, -0.12, -0.11]):
    chain_results(tmp_path, "a", seed, [gap], [0.01 * (seed - 1)])
    chain_results(tmp_path, "b", seed, [gap], [0.0])
  text = open(study.write_study_report(config, str(tmp_path))["table"]).read()
  section = text.split("## The plan's decisions")[1].split("##")[0]
  assert "- a: **ADS poisons students** here: G = -11.0 points" in section
  assert "- b:" not in section  # not a primary arm
  config.study.primary = ()
  text = open(study.write_study_report(config, str(tmp_path))["table"]).read()
  assert "## The plan's decisions" not in text
