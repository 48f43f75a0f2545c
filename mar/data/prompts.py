"""Prompt texts of the multi-attempt paper, verbatim (see METHODS.md section 1).

The dialogue is Qwen2.5-Math ChatML built as text, not through a chat template.
The LTE prompts live in `mar.lte`.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

SINGLE_TURN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def multi_attempt_system(n_attempts: int) -> str:
  """System prompt telling the model it has `n_attempts` tries ("1 attempts" too)."""
  return (
      f"{SINGLE_TURN_SYSTEM} You have {int(n_attempts)} attempts to answer the questions, "
      "and you should provide the full reasoning steps in each attempt."
  )


def chatml_prompt(system: str | None, question: str) -> str:
  """System (none when None) and user turns, then an open assistant turn (ends with a newline).

  The one ChatML builder: both papers' prompts and LTE's hint prompts come through here.
  """
  system_turn = "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"
  return f"{system_turn}{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def system_feedback_turn(text: str) -> str:
  """Closes the assistant turn, adds a system turn of `text`, opens the next assistant turn."""
  return f"{IM_END}\n{IM_START}system\n{text}{IM_END}\n{IM_START}assistant\n"


def multi_attempt_prompt(question: str, n_attempts: int) -> str:
  """The initial prompt of an episode with `n_attempts` attempts allowed."""
  return chatml_prompt(multi_attempt_system(n_attempts), question)


def single_turn_prompt(question: str) -> str:
  """The single-turn baseline prompt (same shape, the plain system prompt)."""
  return chatml_prompt(SINGLE_TURN_SYSTEM, question)


def feedback_text(attempts_left: int) -> str:
  """The system turn appended after a wrong attempt, `attempts_left` already decremented.

  It opens with `<|im_end|>` (closing the assistant turn) and ends by opening the
  next assistant turn.
  """
  return system_feedback_turn(incorrect_text(attempts_left))


def incorrect_text(attempts_left: int) -> str:
  """The feedback turn's words (METHODS.md section 1)."""
  return f"Your answer is incorrect. You have {int(attempts_left)} attempts left. Try an alternative."
