"""LTE host side: hinted prompts from a group's failures and refined training groups.

`mar.lte.hint_prompt(question, answers, truncated)` is the public entry point for hints.
"""

from mar.lte.hints import chat_prompt, hint_kind, hint_prompt, plain_prompt

__all__ = ["chat_prompt", "hint_kind", "hint_prompt", "plain_prompt"]
