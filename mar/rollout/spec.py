"""The static settings of one rollout program (`RolloutSpec`) and the cache it needs.

The rollout engine (`continuous.py`) compiles one program per spec. The cache slot layout
is the dialogue layout (see `mar.sampling`): slot s of row b holds the s-th token of that
row's dialogue. Masks are written from what the engine inserted, never by searching token
ids: `action_mask` marks sampled tokens, `feedback_mask` the inserted feedback spans (from
their leading `<|im_end|>` to `<|im_start|>assistant\\n`). A stop token the model emitted is
rewound and never kept, unless `keep_stop_token` (METHODS.md §1).
"""

from __future__ import annotations

import dataclasses
from mar.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """Static shape and sampling settings of one rollout program (one compile each)."""

  max_attempts: int  # M: attempts an episode may take
  token_budget: int  # generated tokens shared by all attempts of an episode
  cache_len: int  # S: prompt bucket + budget + feedback turns
  sampling: SamplingParams
  stop_ids: tuple[int, ...]
  check_every: int = 1
  # > 0: hybrid mode, the feedback turn also lists the episode's wrong answers (LTE's hint),
  # built on the host and appended with at most this many tokens.
  hint_feedback_len: int = 0
  # True: a model-emitted stop token stays in the transcript as an action (verl's single-turn
  # rule: the EOS is trained). False: it is rewound (multi-attempt: the feedback supplies it).
  keep_stop_token: bool = False


def cache_len_for(prompt_len: int, token_budget: int, max_attempts: int, feedback_len: int) -> int:
  """Slots needed by the longest possible episode."""
  return prompt_len + token_budget + (max_attempts - 1) * feedback_len
