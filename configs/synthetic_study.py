"""The laptop study (docs/synthetic/PLAN.md): does ADS poison students on the synthetic task,
at matched teacher accuracy, with replicate students, an A/A control and the writing-style
confound as a factor?

  python -m antidistill_jax.main --config=configs/synthetic_study.py --workdir=runs/study \
      --config.study.records=docs/synthetic/study/chains --config.study.out=docs/synthetic/study
  python -m antidistill_jax.main --config=configs/synthetic_study.py --workdir=runs/study \
      --shard=i/n                                  # n processes: chain k runs where k % n == i
  python -m antidistill_jax.main --config=configs/synthetic_study.py:free_writing \
      --config.study.seeds=0 --workdir=runs/one   # one arm, one seed

Every arm is configs/synthetic.py's experiment (same models, task sizes, training) with:
  - R = 2 students per trace set (grid.students; replicate r trains with the same
    distillation seed and data order on every trace set of its chain: common random numbers);
  - the temperature sweep widened to 0.8 ... 1.9 and the ADS lams aimed between the teacher's
    accuracy at tau 1.0 and 1.6 (grid.calibrate.between), so ADS and control points lie inside
    the curve they are matched against;
  - the A/A control: plain sampling at tau 1.0, 1.3, 1.6 from another sampling stream;
  - 1,024 holdout problems: g from the greedy traces of the first 512 (grad.rows), every
    student's NLL on the other 512 (traces g never saw);
  - 2,048 test problems (binomial SD of an accuracy <= 1.1 points).
The arms (study.arms; `--config=configs/synthetic_study.py:ARM` is one arm's experiment):
  fixed_writing        the task has one writing (operands in order, steps joined by ","), the
                       student's pre-training uses it too: only a trace's content can carry
                       poison;
  free_writing         free writing (either operand order, ";" or ","), the student pre-trained
                       on the same free writing (its prior matches the teacher's style);
  free_writing_g_tau1  free_writing with g computed on the teacher's tau = 1 traces of the same
                       512 problems instead of its greedy ones (the factor "g's traces"); it
                       shares free_writing's models, temperature and control students.
A chain (arm, seed) is the whole experiment at `seed` (problems, models, g, traces, students).
"""

import os
import runpy

_here = os.path.dirname(os.path.abspath(__file__))
synthetic = runpy.run_path(os.path.join(_here, "synthetic.py"))

ARMS = ("fixed_writing", "free_writing", "free_writing_g_tau1")
SEEDS = tuple(range(8))


def get_config(arm: str = "free_writing"):
  if arm not in ARMS:
    raise ValueError(f"unknown arm {arm!r}: expected one of {', '.join(ARMS)} "
                     "(--config=configs/synthetic_study.py:ARM).")
  c = synthetic["get_config"]()
  c.job = "study"
  c.study.update(dict(arm=arm, arms=ARMS, seeds=SEEDS,
                      contrasts=(("free_writing_g_tau1", "free_writing"),
                                 ("fixed_writing", "free_writing")),
                      primary=("fixed_writing", "free_writing")))
  c.data.update(dict(max_holdout=1024, max_test=2048))
  c.grad.rows = 512
  c.grid.update(dict(temperatures=(0.8, 1.0, 1.3, 1.6, 1.9), controls=(1.0, 1.3, 1.6),
                     students=2))
  c.grid.calibrate.between = (1.0, 1.6)
  pretrain = c.scratch.student.pretrain.task
  if arm == "fixed_writing":
    c.data.task.update(dict(order="fixed", separators=(",",)))
    pretrain.update(dict(order="fixed", separators=(",",)))
  else:
    pretrain.update(dict(order="free", separators=(";", ",")))
  if arm == "free_writing_g_tau1":
    c.grad.tau = 1.0
  return c
