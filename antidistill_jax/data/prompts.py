"""Chat prompts for the teacher: the reference's system prompt and user turn, as token ids.

The reference code sends every problem as the two turns
  {"role": "system", "content": SYSTEM_PROMPT}
  {"role": "user", "content": problem.strip() + "\\n"}
through the teacher's chat template with the generation prompt, and drops prompts longer than
max_prompt_length tokens. `build_prompts` does the same and says how many it dropped.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from absl import logging

from antidistill_jax.tokenizer import prompt_ids

# The authors' system prompt (utils.py of the reference code), used for GSM8K, MATH and MMLU.
SYSTEM_PROMPT = (
    "You are a math teacher. You will be given a math problem and you will solve it step by "
    "step.\nYou will output your final solution like \\boxed{ANSWER}. Be sure to include "
    "relevant units within the brackets and fully evaluate arithmetic expressions.\n")


class Prompts(NamedTuple):
  ids: list[list[int]]  # token ids of each kept prompt
  indices: list[int]    # position in `examples` of each kept prompt
  dropped: int          # prompts longer than max_prompt_length


def user_message(problem: str) -> str:
  return problem.strip() + "\n"


def _problem(example: Any) -> str:
  if isinstance(example, str):
    return example
  return example["problem"] if isinstance(example, dict) else example.problem


def build_prompts(tokenizer, examples: Sequence[Any], max_prompt_length: int, *,
                  system: str | None = SYSTEM_PROMPT) -> Prompts:
  """Chat prompt ids of `examples` (Examples, {"problem": ...} dicts or strings) that fit in
  max_prompt_length tokens; system=None sends no system turn."""
  ids, indices = [], []
  for i, example in enumerate(examples):
    p = prompt_ids(tokenizer, user_message(_problem(example)), system=system)
    if len(p) <= max_prompt_length:
      ids.append(p)
      indices.append(i)
  dropped = len(examples) - len(ids)
  if dropped:
    logging.warning("dropped %d of %d prompts longer than %d tokens; to keep them, raise the "
                    "limit (the pipeline's --config.prompts.max_prompt_length).", dropped,
                    len(examples), max_prompt_length)
  return Prompts(ids, indices, dropped)
