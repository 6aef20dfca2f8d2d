"""The paper's experiment as declared stages over the library.

  stage         reads                              writes (workdir/<stage>/<key>/)
  models        config.tiny or config.scratch      teacher/, proxy/, student/ checkpoints
  holdout       teacher, holdout split             traces.jsonl: greedy teacher traces
  grad          proxy, holdout traces (grad.rows)  grad/: g, the proxy's NLL gradient
  calibrate     teacher, proxy, g, holdout split   (record) the ADS lams (grid.calibrate)
  sample        teacher, proxy, g, train split     traces.jsonl per grid point
  distill       student, a point's traces          student/ (merged), train/curves.json
                (grid.students replicates each)
  eval_student  a distilled student, test split    eval.jsonl
  eval_teacher  teacher (+ proxy, g), test split   eval.jsonl per grid point
  eval_base     the undistilled student            eval.jsonl
  report        the records                        index/, report/ (figures, tables), under
                                                   results/<pipeline.name>/ when named

A stage is data (`loop.Stage`: name, items, key, compute); `loop.run_stage` runs every stage
the same way and `store.Store` keeps the workdir: outputs are found by key, a finished output
has exactly one record (records/<stage>/<key>.json, written once), a key is computed by the
one job that claims it, and concurrent `--shard` jobs share shared stages instead of each
running them. Keys hash what changes an output and nothing else, and never a loaded model:
checkpoints are known by a hash of their files (`identity`), the models the pipeline makes by
the key of the stage that made them.

Grid points (`grid`): ADS at each tau in grid.ads_taus with lam = b * eps for b in
grid.ads_lam_over_eps (or the calibrated lams), the temperature baseline at each tau in
grid.temperatures with lam = 0, and the A/A control (grid.controls: plain sampling from
another sampling stream). Each point's traces train grid.students students (`Student`:
point, attacker, replicate). `shard=(i, n)` runs the points whose index is i mod n.
"""

from antidistill_jax.pipeline.experiment import PER_POINT, STAGES, Experiment
from antidistill_jax.pipeline.inputs import Inputs, Loaded, resolve_checkpoint, sampling_key
from antidistill_jax.pipeline.grid import (Point, Student, calibrated_lams, grid, parse_shard,
                                           shard_points)
from antidistill_jax.pipeline.store import Store, check_workdir, key_of

__all__ = ["Experiment", "Inputs", "Loaded", "PER_POINT", "Point", "STAGES", "Store", "Student",
           "calibrated_lams", "check_workdir", "grid", "key_of", "parse_shard",
           "resolve_checkpoint", "sampling_key", "shard_points"]
