"""Defences x attackers on the laptop task (issue 21): which defence survives which attacker, at
matched teacher accuracy, with seeds.

  python -m antidistill_jax.main --config=configs/matrix.py --workdir=runs/study \
      --config.study.records=docs/matrix/chains \
      --config.study.out=docs/matrix          # [--shard=i/n: chain k where k % n == i]

Each seed is the study's free_writing chain (configs/synthetic_study.py: the same models, g,
lambda calibration, temperature sweep, A/A control and passive students, under the same keys:
run it in the study's workdir and all of that is reused) plus:

Defences (points; strength traced, one compile per sweep):
  temperature  0.8 ... 1.9, the curve every cell is matched against;
  ADS          3 lams calibrated between the teacher's accuracy at tau 1.0 and 1.6 (jvp);
  aligned      ADS with the answer-aligned g (antidistill_jax/aligned.py), 3 lams calibrated
               the same way: at the ADS lams it took the teacher to 5-11% (seed 0, train
               split), far below the temperature curve, where nothing can be matched;
  poe          product of experts (The Distillation Game; ysfalh/distillation-game:
               ((1 - gamma) log p_T + gamma log p_P) / tau) at gamma 0.3 and 0.6 (reported:
               0.6-0.7) and tau 1.0, the ADS tau: the reported tau 0.6 lies below this study's
               temperature curve (0.8-1.9), where no gap can be matched; no top-p (reported:
               0.95; this task's sampling has none);
  control      the A/A control: plain sampling at tau 1.0, 1.3, 1.6 from other seeds (passive
               students only: it checks the matching, not the attackers).
Attackers (attacks.kinds: on every defence and temperature point, so each is matched against
temperature students it attacked alike; one student per attacked set, attacks.students):
  passive, keep_correct, clean_mix (300 plain traces; defence points only), reaimed (existing);
  reweight (beta 0.5, the reference code's sign and value: weights up traces whose SFT step
  raises the student's clean loss) and reweight@-0.5 (the opposite sign); reweight_mass (added
  after seed 6, docs/matrix/PLAN.md "Deviations": the same sign with |beta| solved per set so
  the most-weighted fifth of the traces holds 22% of the weight, the reference's own runs'
  concentration; beta 0.5 on this task's scores put 89-97% on that fifth);
  resample@2 (the public degeneracy filter + re-queries up to 2x the served queries, 3 rounds).
  The filter flags almost nothing on this task (seed 0: 0-2 of 3,000 traces per ADS, PoE and
  aligned set, 0-40 per temperature set), so every budget above 1.02x re-queries all it flags
  and budgets 1, 1.5, 2 and 4 train on sets that differ by at most those traces: one column.
Not here: prefill. Every trace of this task begins with the problem's own first number, so no
fixed opening words exist to prefill; the attacker is built and tested (attacks.prefill.text)
for tasks that have them (an R1-style teacher's "Okay, so ...").

The arm gsm8k_paper (`--config=configs/matrix.py:gsm8k_paper`) is the same matrix on the paper's
GSM8K setup (configs/gsm8k_paper.py: its models, prompts, sampling, top-k 50 / top-p 0.95 and
LoRA distillation, unchanged) for a pod:
  launch/tpu.sh run --config=configs/matrix.py:gsm8k_paper --workdir=gs://BUCKET/matrix \
      --shard=i/n
Its grid replaces the paper's 59-point sweep with what the matrix needs: temperatures 0.6 ... 2.0
(0.6 for the product of experts at its reported tau 0.6, gammas 0.6 and 0.7, with top-p 0.95), 3
ADS and 3 answer-aligned lams calibrated between the teacher's accuracy at tau 1.0 and 1.6 on
256 holdout problems, the A/A control at tau 1.0 and 1.4, R = 2 passive students per set; every
attacker above on every defence and temperature point, the resampling budget as a column (1x,
1.5x, 2x, 4x: its re-queries are sampled once and shared), and prefill with "Okay" (R1-style traces
open "Okay, so ..."): the teacher samples every attacked set a second time from there, and the
resampling attacker re-queries what the filter flags, so the sampling is about twice the 18
served sets'. Three seeds (sampling, distillation and attacker draws; g and the splits are
shared): with the synthetic study's between-seed SD of ~4 points a 3-seed t interval is about
+-10 points; add seeds (--config.study.seeds=0,1,2,3,4) for less.

The report (study.matrix): docs/matrix/matrix.md (rows defence and strength with the teacher's
accuracy and cost per token, columns attackers, each cell the gap and its 95% t CI over seeds),
heatmap.png, frontier.png, beside the study's own tables.
"""

import os
import runpy

_here = os.path.dirname(os.path.abspath(__file__))
study = runpy.run_path(os.path.join(_here, "synthetic_study.py"))
paper = runpy.run_path(os.path.join(_here, "gsm8k_paper.py"))

# Each arm is its own study (study.arms is the arm alone): the laptop matrix, or the pod's.
ARMS = ("matrix", "gsm8k_paper")
# The laptop matrix's seeds are the study's last four, its last two first: a matrix seed
# extends the study's free_writing chain of that seed (same keys), so run in the study's
# workdir it starts from what the study finished last (the workdir of seeds 0-5 was lost).
SEEDS = {"matrix": (6, 7, 4, 5), "gsm8k_paper": (0, 1, 2)}
# Every arm's attackers; each arm adds its resampling budgets (and the pod's, prefill).
ATTACKERS = ("keep_correct", "clean_mix", "reaimed", "reweight", "reweight@-0.5",
             "reweight_mass")
DEFENCES_AND_BASELINE = ("ads", "aligned", "poe", "temperature")


def get_config(arm: str = "matrix"):
  if arm not in ARMS:
    raise ValueError(f"unknown arm {arm!r}: expected one of {', '.join(ARMS)} "
                     "(--config=configs/matrix.py:ARM).")
  if arm == "matrix":
    c = study["get_config"]("free_writing")
    c.grid.update(dict(aligned=True, poe_taus=(1.0,), poe_gammas=(0.3, 0.6)))
    names = ATTACKERS + ("resample@2",)
  else:
    c = paper["get_config"]()
    c.job = "study"
    c.grid.update(dict(ads_taus=(1.0,), ads_lam_over_eps=(),
                       temperatures=(0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0),
                       controls=(1.0, 1.4), students=2, aligned=True, poe_taus=(0.6,),
                       poe_gammas=(0.6, 0.7)))
    c.grid.calibrate.update(dict(points=3, between=(1.0, 1.6)))
    c.attacks.prefill.text = "Okay"
    # R1-style traces under ADS are reported to degenerate, so the query budget is a column here:
    # 1x (the filter alone), 1.5x, 2x, 4x (the re-queries are shared: only students are added).
    names = ATTACKERS + ("resample@1", "resample@1.5", "resample@2", "resample@4", "prefill")
  # docs/matrix/PLAN.md: the primary cells are the defences' mean rows under the planned
  # attackers; reweight_mass, added after seed 6 ("Deviations"), is secondary.
  secondary = ("reweight_mass",) if arm == "matrix" else ()
  c.study.update(dict(arm=arm, arms=(arm,), seeds=SEEDS[arm], contrasts=(), primary=(),
                      matrix=True, matrix_secondary=secondary))
  c.attacks.update(dict(names=names, kinds=DEFENCES_AND_BASELINE, students=1))
  return c
