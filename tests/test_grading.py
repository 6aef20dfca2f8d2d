"""Grading: GSM8K numbers, MATH through math-verify (and its fallback), MMLU letters, the
synthetic task's "#" answers, answer forcing, accuracy."""

import json
import os
import threading

import pytest

from antidistill_jax import grading as gr

GSM8K_TEST = os.path.join(os.environ.get("ANTIDISTILL_GSM8K_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k"), "test.jsonl")


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("#### 1,080", "1080"),
    ("So she pays \\boxed{\\$1,250.00} in total.", "1250"),
    ("The answer is \\boxed{18\\%}.", "18"),
    ("\\boxed{2 \\times 9 = 18 \\text{ dollars}}", "18"),
    ("The temperature drops to -5 degrees.", "-5"),
    ("It costs $5.0.", "5"),
    ("She has 3-4 apples, so 0.50 each.", "0.5"),
    ("#### 12\nThen 7 more words.", "12"),
    ("Twelve of them.", None),
])
def test_gsm8k_extraction(text, number):
  assert gr.extract_answer("gsm8k", text) == number


@pytest.mark.parametrize("boxed", [
    "10\\,000", "10\\!000", "10\\ 000", "10{,}000", "10\\,000.00", "\\$10\\,000",
    "10\u2009000", "10\u202f000",
])
def test_gsm8k_latex_thousands_separators(boxed):
  for gold in ("#### 10000", "He saves 10 * 1000 = <<10*1000=10000>>10000\n#### 10,000"):
    assert gr.is_correct("gsm8k", gold, f"So the total is \\boxed{{{boxed}}} dollars.")
  assert not gr.is_correct("gsm8k", "#### 10", f"\\boxed{{{boxed}}}")
  assert not gr.is_correct("gsm8k", "#### 0", f"\\boxed{{{boxed}}}")


def test_gsm8k_thin_spaces_between_separate_numbers():
  # A thin space before a group that is not 3 digits is spacing, not a thousands separator.
  assert gr.extract_answer("gsm8k", "\\boxed{12\\,34}") == "34"
  assert gr.extract_answer("gsm8k", "\\boxed{1\\,000\\,000}") == "1000000"
  assert gr.extract_answer("gsm8k", "\\boxed{7\\,\\text{apples}}") == "7"


def test_gsm8k_compare():
  gold = "He earns 5 * 200 = <<5*200=1000>>1000 dollars.\n#### 1,000"
  assert gr.is_correct("gsm8k", gold, "So he makes $1000.")
  assert gr.is_correct("gsm8k", gold, "The answer is \\boxed{1,000.00}")
  assert not gr.is_correct("gsm8k", gold, "The answer is \\boxed{100}. Later 1000.")
  assert not gr.is_correct("gsm8k", gold, "I cannot tell.")
  assert gr.is_correct("gsm8k", "#### -3", "the change is \\boxed{-3}")
  assert not gr.is_correct("gsm8k", "#### -3", "the change is \\boxed{3}")


@pytest.mark.skipif(not os.path.isfile(GSM8K_TEST),
                    reason=f"{GSM8K_TEST} not found (set ANTIDISTILL_GSM8K_DIR)")
def test_every_gsm8k_test_gold_grades_correct():
  with open(GSM8K_TEST) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1319
  for row in rows:
    solution = row["answer"]
    number = int(solution.rsplit("####", 1)[1].replace(",", ""))
    assert gr.is_correct("gsm8k", solution, solution), solution
    assert gr.is_correct("gsm8k", solution, f"Step by step... The answer is \\boxed{{{number}}}.")
    assert gr.is_correct("gsm8k", solution, f"In total ${number:,}.")
    assert not gr.is_correct("gsm8k", solution, f"... The answer is \\boxed{{{number + 1}}}.")


@pytest.mark.parametrize("gold, pred", [
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\frac12", "\\dfrac{1}{2}"),
    ("\\sqrt{2}", "\\sqrt2"), ("3\\sqrt{2}", "\\sqrt{18}"), ("[2, 5)", "[2,5)"),
    ("(-\\infty, 3]", "(-\\infty,3]"), ("x^2+2x+1", "(x+1)^2"), ("9\\pi", "9 \\pi"),
    ("60^\\circ", "60"),
])
def test_math_equivalent(gold, pred):
  solution = f"Therefore the answer is $\\boxed{{{gold}}}$."
  assert gr.is_correct("math", solution, f"<think>work</think> So we get $\\boxed{{{pred}}}$.")


@pytest.mark.parametrize("gold, pred", [
    ("\\frac{1}{2}", "\\frac{1}{3}"), ("\\sqrt{2}", "2"), ("[2, 5)", "(2, 5)"),
    ("x^2+2x+1", "(x-1)^2"), ("9\\pi", "9"),
])
def test_math_different(gold, pred):
  assert not gr.is_correct("math", f"$\\boxed{{{gold}}}$", f"$\\boxed{{{pred}}}$")


def test_math_no_box_and_nested_braces():
  solution = "So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$."
  assert gr.extract_answer("math", solution) == "\\frac{\\sqrt{3}}{2}"
  assert gr.is_correct("math", solution, "\\boxed{\\frac{\\sqrt3}{2}}")
  assert not gr.is_correct("math", solution, "I think it is sqrt(3)/2")  # nothing boxed


def test_math_falls_back_to_strings_when_math_verify_fails(monkeypatch):
  from math_verify.errors import TimeoutException

  def times_out(gold, pred):
    raise TimeoutException("slow")

  monkeypatch.setattr(gr, "_math_verify_equal", times_out)
  assert gr.is_correct("math", "\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac{1}{2}.}")
  assert not gr.is_correct("math", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}")


def test_math_grading_in_a_thread():
  # math-verify's SIGALRM timeout raises outside the main thread: graded by strings there.
  results = []
  thread = threading.Thread(target=lambda: results.extend([
      gr.is_correct("math", "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}"),
      gr.is_correct("math", "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{3}}")]))
  thread.start()
  thread.join()
  assert results == [True, False]


@pytest.mark.parametrize("text, letter", [
    ("... so \\boxed{B}", "B"), ("\\boxed{\\text{(C)}}", "C"), ("\\boxed{d}", "D"),
    ("\\boxed{A. Paris}", "A"), ("The answer is (D).", "D"), ("Answer: A", "A"),
    ("**Answer:** **B**", "B"), ("Option C is correct.", "C"),
    ("A is wrong, B too. The answer is C", "C"), ("I am not sure.", None),
])
def test_mmlu_letters(text, letter):
  assert gr.extract_answer("mmlu", text) == letter


def test_mmlu_compare():
  assert gr.is_correct("mmlu", "\\boxed{B}", "Paris is B. So the answer is \\boxed{B}")
  assert not gr.is_correct("mmlu", "\\boxed{B}", "The answer is (C)")
  assert not gr.is_correct("mmlu", "\\boxed{B}", "no idea")


@pytest.mark.parametrize("completion, correct", [
    ("3+5=8;8+2=10#10", True),
    ("3+5=8;8+2=11#11", False),
    ("3+5=8;8+2=10", False),          # no "#": no answer
    ("#3 then more#10", True),        # the last "#" counts
    ("3+5=8#8 and then #11", False),
    ("#### 10", True),
    ("# ten", False),
])
def test_synthetic_grader(completion, correct):
  assert gr.is_correct("synthetic", "3+5=8;8+2=10#10", completion) is correct
  assert gr.grader("Synthetic") == "synthetic"


def test_synthetic_answer_forcing_reads_no_box():
  gold = "3+5=8;8+2=10#10"
  assert gr.extract_answer("synthetic", "#-4") == "-4"
  assert not gr.is_correct("synthetic", gold, gr.forced_completion_text("3+5=8;8+2=10", "10}"))
  assert gr.is_correct("synthetic", gold, gr.forced_completion_text("3+5=8;8+2=10#10", "3}"))


def test_dataset_names():
  assert gr.grader("hendrycks_math") == "math"  # whole names: no split("_")[1]
  assert gr.grader("GSM8K") == "gsm8k" and gr.grader("jsonl:/a/b_c.jsonl") == "math"
  assert gr.grader("gsm8k_platinum") == "gsm8k"  # a split's name grades like its dataset
  with pytest.raises(ValueError, match="unknown dataset"):
    gr.grader("math_holdout")


def test_answer_forcing():
  assert gr.close_think("<think>so 17") == "<think>so 17\n</think>"
  assert gr.close_think("so 17") == "so 17\n</think>"  # R1 templates open <think> in the prompt
  assert gr.close_think("<think>a</think>The answer is 3.") == "<think>a</think>The answer is 3."
  assert gr.close_think("<think>a</think> <think>b") == "<think>a</think> <think>b\n</think>"
  assert gr.answer_forcing_prefix("<think>17").endswith("</think>" + gr.FORCE_ANSWER)
  assert gr.FORCE_ANSWER == "\n\n**Final Answer**\n\\[\\boxed{"
  text = gr.forced_completion_text("<think>5 + 13 is 17", "18}\n\\]")
  assert text == "<think>5 + 13 is 17\n</think>\n\n**Final Answer**\n\\[\\boxed{18}\n\\]"
  assert not gr.is_correct("gsm8k", "#### 18", "<think>5 + 13 is 17")
  assert gr.is_correct("gsm8k", "#### 18", text)
  assert gr.is_correct("gsm8k", "#### 18", gr.forced_completion_text("<think>17", "18"))  # cut
  assert not gr.is_correct("gsm8k", "#### 18", gr.forced_completion_text("<think>17", "19}"))
  # As in the reference, the trace before the forcing string counts too.
  assert gr.is_correct("gsm8k", "#### 18", gr.forced_completion_text("\\boxed{18}", "19}"))
  assert gr.is_correct("math", "\\boxed{\\frac12}", gr.forced_completion_text("x", "0.5}\n\\]"))
  assert gr.is_correct("mmlu", "\\boxed{C}", gr.forced_completion_text("hmm", "C}\n\\]"))


def test_accuracy():
  solutions = ["#### 1", "#### 2", "#### 3", "#### 4"]
  assert gr.accuracy("gsm8k", solutions, ["\\boxed{1}", "2", "\\boxed{4}", "no"]) == 0.5
  with pytest.raises(ValueError, match="4 solutions but 3 completions"):
    gr.accuracy("gsm8k", solutions, ["1", "2", "3"])
