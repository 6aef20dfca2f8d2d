"""The README's main job: one seed of the study's `free_writing` arm, reduced to fit 8 minutes
on 2 CPU cores, with its gap's CI from the study's measured student noise.

  python -m antidistill_jax.main                  # this config, in runs/quick
  python -m antidistill_jax.main --config=configs/quick.py --config.seed=3 --workdir=runs/q3

It is configs/synthetic_study.py:free_writing (the task with free writing, the student
pre-trained on that same writing, 1,024 holdout problems with g from the first 512, 2,048
test problems, the same models, training and sampling) with a smaller grid:
  - temperatures 1.0 and 1.6 only, and one ADS lam aimed at the teacher accuracy halfway
    between theirs (grid.calibrate.points = 1), so that the ADS point lies inside the
    two-point curve it is matched against;
  - one student per trace set (three students), no A/A control.
Its models, holdout traces and g are the study's seed-0 chain's (same keys): a workdir that holds
the study reuses them.

The report ends with the ADS point's gap, a 95% CI from student noise alone
(report.student_sd: the SD between replicate students of one trace set, measured by the study
in this arm) and the smallest gap one seed with one student per set can detect. What a single
seed cannot give, the between-seed spread, is the study's (docs/synthetic/study/results.md).
"""

import os
import runpy

study = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "synthetic_study.py"))
ARM = "free_writing"


def get_config():
  c = study["get_config"](ARM)
  c.job = "experiment"
  c.study.update(dict(arm="", arms=(), seeds=(), contrasts=()))
  c.grid.update(dict(temperatures=(1.0, 1.6), controls=(), students=1))
  c.grid.calibrate.update(dict(points=1, between=()))
  # docs/synthetic/study/results.json, between_students.by_arm.free_writing (pooled SD over the
  # arm's trace sets; tests/test_configs.py checks it against the committed file).
  c.report.update(dict(student_sd=0.049,
                       student_sd_source="the study's free_writing arm, docs/synthetic/study"))
  return c
