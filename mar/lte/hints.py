"""LTE prompts: the plain GRPO prompt and the hint built from a group's own failures.

Templates are verbatim from METHODS.md §2. The hint lists the distinct final answers of
the rollouts that finished (the wrong ones: hints are built only for all-fail groups) and
asks for concision when some rollouts ran out of length.
"""

from __future__ import annotations

from typing import Sequence

from mar.data import prompts

_STEP = "Let's think step by step and output the final answer within \\boxed{}."
_CONCISE = "Let's think concisely and output the final answer within \\boxed{}."
_DONT_MENTION = "Do not use or mention the hint explicitly in any of your intermediate steps."
_HINT_LEAD = "Hint: possible incorrect answers include "

HINT_KINDS = ("plain", "hint", "concise_hint", "concise")


def plain_prompt(question: str) -> str:
  """The LTE / GRPO user message: the question then the step-by-step instruction."""
  return f"{question}\n{_STEP}"


def chat_prompt(user_text: str) -> str:
  """Wraps one user message in Qwen ChatML, ending at the open assistant turn.

  No system turn: LTE trains base models (Qwen3-*-Base) and its prompts carry all
  instructions in the user message; a default system prompt would be text the method
  never specified.
  """
  return prompts.chatml_prompt(None, user_text)


def usable_answers(answers: Sequence[str | None], truncated: Sequence[bool]) -> list[str]:
  """Distinct answers of non-truncated rollouts, first-seen order.

  None (no closed box) and answers empty after stripping whitespace are skipped;
  duplicates are exact-string after stripping.
  """
  if len(answers) != len(truncated):
    raise ValueError(
        f"hints.py: answers and truncated differ in length: {len(answers)} vs {len(truncated)}"
    )
  seen: dict[str, None] = {}
  for ans, trunc in zip(answers, truncated):
    if trunc or ans is None:
      continue
    ans = ans.strip()
    if ans:
      seen.setdefault(ans, None)
  return list(seen)


def hint_kind(answers: Sequence[str | None], truncated: Sequence[bool]) -> str:
  """Which template applies: 'plain', 'hint', 'concise_hint' or 'concise' (for metrics)."""
  any_answer = bool(usable_answers(answers, truncated))
  any_truncated = any(bool(t) for t in truncated)
  if any_answer:
    return "concise_hint" if any_truncated else "hint"
  return "concise" if any_truncated else "plain"


def hint_prompt(
    question: str, answers: Sequence[str | None], truncated: Sequence[bool], sep: str = ", "
) -> str:
  """The hinted user message for an all-fail group.

  Args:
    question: the problem text.
    answers: answers[i] = extracted final answer of rollout i, None when it had no closed box.
    truncated: truncated[i] = rollout i hit the length limit (its answer is ignored).
    sep: separator between listed answers.

  Cases: all truncated -> Concise; some truncated with >= 1 usable answer -> ConciseHint;
  none truncated with >= 1 answer -> Hint; no usable answer -> Concise if any truncated,
  else the plain prompt.
  """
  kind = hint_kind(answers, truncated)
  if kind == "plain":
    return plain_prompt(question)
  if kind == "concise":
    return f"{question}\n{_CONCISE}"
  listed = sep.join(usable_answers(answers, truncated))
  ending = _CONCISE if kind == "concise_hint" else _STEP
  return f"{question}\n{_HINT_LEAD}{listed}\n{_DONT_MENTION} {ending}"


def hint_feedback_text(attempts_left: int, wrong_answers: Sequence[str], sep: str = ", ") -> str:
  """Hybrid of the two papers: the multi-attempt feedback turn, plus LTE's hint line.

  The system turn says the answer was wrong and how many attempts are left, then lists the
  distinct wrong answers given so far (first-seen order). With no answers it is exactly
  the plain multi-attempt feedback.
  """
  listed = sep.join(dict.fromkeys(a.strip() for a in wrong_answers if a and a.strip()))
  if not listed:
    return prompts.feedback_text(attempts_left)
  return prompts.system_feedback_turn(
      f"{prompts.incorrect_text(attempts_left)}\n{_HINT_LEAD}{listed}")
