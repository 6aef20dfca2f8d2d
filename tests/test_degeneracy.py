"""The degeneracy rules and the resampling attacker: each rule flags what it states and nothing
else, a budget of 1 is the filter alone, rules that flag nothing change nothing, and the
re-queries are taken in the order asked, up to the budget."""

import pytest

from antidistill_jax import attacks, degeneracy

RULES = degeneracy.Rules()  # the public filter's: one foreign letter, 8 copies of a token


def row(index, text="12+3=15", ids=(1, 2, 3, 4), correct=True):
  return dict(index=index, completion=text, completion_ids=list(ids), correct=correct)


def test_script_rule_flags_foreign_letters_only():
  for text in ("x = 3, so α + β = π", "𝑥 is fine", "digits 0123 and symbols ∑√≤ too"):
    assert degeneracy.check(row(0, text), RULES) is None, text
  # The public rule reads Unicode names: DOUBLE-STRUCK CAPITAL R names no script, so it counts.
  for text in ("the answer 是 4", "ответ 4", "x = 3 حسنا", "x in ℝ"):
    assert degeneracy.check(row(0, text), RULES) == "script", text
  two = degeneracy.Rules(min_foreign_run=2)
  assert degeneracy.check(row(0, "a 是 b 是"), two) is None
  assert degeneracy.check(row(0, "a 是是 b"), two) == "script"
  assert degeneracy.check(row(0, "the answer 是 4"), degeneracy.Rules(min_foreign_run=0)) is None


def test_repeat_rule_counts_copies_in_a_row():
  assert degeneracy.check(row(0, ids=[5] * 7 + [6] + [5] * 7), RULES) is None
  assert degeneracy.check(row(0, ids=[1, 2] + [5] * 8 + [3]), RULES) == "repeat"
  loop = [1, 2] * 8  # a two-token phrase, eight times
  assert degeneracy.check(row(0, ids=loop), RULES) is None  # single tokens only
  assert degeneracy.check(row(0, ids=loop), degeneracy.Rules(max_period=2)) == "repeat"
  assert degeneracy.check(row(0, ids=loop[:-1]), degeneracy.Rules(max_period=2)) is None
  assert degeneracy.most_copies([]) == 0 and degeneracy.most_copies([4]) == 1
  assert degeneracy.most_copies([1, 2, 3, 1, 2, 3, 1, 2, 3], max_period=3) == 3
  with pytest.raises(ValueError, match="flags every"):
    degeneracy.Rules(min_copies=1)


BAD = dict(ids=[7] * 9)


def test_resampling_takes_requeries_in_order_up_to_the_budget():
  served = [row(0), row(1, **BAD), row(2), row(3, **BAD)]
  round1 = [row(1, text="fixed 1"), row(3, **BAD)]  # prompt 3 is degenerate again
  round2 = [row(3, text="fixed 3")]
  rounds = [round1, round2]
  kept, stats = attacks.resampled(served, rounds, budget=1.0, rules=RULES)  # the filter alone
  assert [r["index"] for r in kept] == [0, 2] and stats["requeried"] == 0
  assert stats["queries"] == 1.0 and stats["flagged"] == 2 and stats["still_repeat"] == 2
  kept, stats = attacks.resampled(served, rounds, budget=1.25, rules=RULES)  # one re-query
  assert [r["completion"] for r in kept] == ["12+3=15", "fixed 1", "12+3=15"]
  kept, stats = attacks.resampled(served, rounds, budget=1.5, rules=RULES)  # round 1 whole
  assert [r["index"] for r in kept] == [0, 1, 2] and stats["queries"] == 1.5
  kept, stats = attacks.resampled(served, rounds, budget=4.0, rules=RULES)  # all it was given
  assert [r["completion"] for r in kept] == ["12+3=15", "fixed 1", "12+3=15", "fixed 3"]
  assert stats["requeried"] == 3 and stats["queries"] == 1.75 and stats["replaced_kept"] == 2


def test_rules_that_flag_nothing_change_nothing():
  served = [row(0), row(1, **BAD), row(2, text="是", correct=False)]
  nothing = degeneracy.Rules(min_foreign_run=0, min_copies=0)
  for budget in (1.0, 2.0):
    kept, stats = attacks.resampled(served, [], budget=budget, rules=nothing)
    assert kept == served and stats["flagged"] == 0 and stats["queries"] == 1.0
  # Re-queries of traces the rules do not flag are inputs from other rules: refused.
  with pytest.raises(ValueError, match="other rules"):
    attacks.resampled(served, [[row(1)]], budget=2.0, rules=nothing)


def test_resample_settings_read_the_budget_from_the_id():
  from configs import base
  c = base.get_config().attacks
  assert attacks.settings("resample", c)["budget"] == c.resample.budget
  s = attacks.settings("resample@4", c)
  assert s["budget"] == 4.0 and s["rules"] == dict(min_foreign_run=1, min_copies=8, max_period=1)
  with pytest.raises(ValueError, match=">= 1"):
    attacks.settings("resample@0.5", c)
