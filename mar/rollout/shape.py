"""The static sizes of a config's rollout program: rows, prompt widths, cache length, queue.

`setup.build_run` sizes its `RolloutRunner` with it, and `mar.tools.plan_memory` /
`mar.tools.compiled_memory` plan and compile the same program from it, so the three agree
(tests/rollout_shape_test.py checks every variant of every config in configs/).
"""

from __future__ import annotations

import dataclasses

from mar import methods
from mar.rollout import spec as spec_lib
from mar.rollout import runner as runner_lib

# Tokens of one multi-attempt feedback turn (METHODS.md §1), rounded up: what the planners
# reserve per turn (the runner sizes its cache from the tokenizer's own feedback table).
FEEDBACK_LEN = 24


@dataclasses.dataclass(frozen=True)
class RolloutShape:
  """One training step's rollout program at its largest prompt bucket."""

  rows: int  # rows decoding together (rollout.batch_size, or the step's episodes)
  episodes: int  # episodes of one step: prompts (PPO) or prompts x G (GRPO / LTE)
  prompt_len: int  # the largest prompt bucket
  prompt_widths: tuple[int, ...]  # every prompt bucket, the largest last
  attempts: int  # M (1 for GRPO / LTE)
  feedback_len: int  # slots of one feedback turn
  cache_len: int  # slots of the longest possible episode
  queue: int  # the continuous engine's queue: episodes padded to a multiple of rows


def step_episodes(config) -> int:
  """Episodes one training step rolls out: one per prompt (PPO), a group of G (GRPO / LTE)."""
  return config.rollout.prompts_per_step * methods.of(config).rows_per_prompt(config)


def rollout_rows(config) -> int:
  """rollout.batch_size, or (0) every episode of a step in one program."""
  rows = int(config.rollout.batch_size)
  if rows < 0:
    raise ValueError(f"config.rollout.batch_size={rows}: -1 (fit to device memory) must be "
                     "resolved first (python -m mar.tools.plan_memory --fit prints the rows)")
  return rows or step_episodes(config)


def rollout_shape(config, feedback_len: int = FEEDBACK_LEN) -> RolloutShape:
  """The rollout program of `config`; `feedback_len`: slots of one feedback turn (the runner
  passes its tokenizer's, the planners `FEEDBACK_LEN`)."""
  r, attempts = config.rollout, methods.of(config).max_attempts(config)
  feedback = max(feedback_len, r.hint_feedback_len) if attempts > 1 else r.hint_feedback_len
  rows, episodes = rollout_rows(config), step_episodes(config)
  return RolloutShape(
      rows=rows, episodes=episodes, prompt_len=r.prompt_len,
      prompt_widths=runner_lib.prompt_buckets(r.prompt_len), attempts=attempts,
      feedback_len=feedback,
      cache_len=spec_lib.cache_len_for(r.prompt_len, r.token_budget, attempts, feedback),
      queue=runner_lib.queue_len(episodes, rows))


# ----- the sizes -1 asks to fit (setup.resolve_auto_sizes, plan_memory --fit) ---------------


def row_candidates(config, data_shards: int) -> list[int]:
  """Rollout rows to try, largest first: multiples of the sampling layout's data shards up to
  the config's rows (-1 or 0: the step's episodes), those dividing the episodes first."""
  episodes = step_episodes(config)
  top = int(config.rollout.batch_size)
  top = episodes if top <= 0 else top
  rows = [r for r in range(top - top % data_shards, 0, -data_shards)]
  return sorted(rows, key=lambda r: (episodes % r != 0, -r)) if rows else [top]


def micro_candidates(config) -> list[int]:
  """Micro-batch counts to try, fewest (largest micro-batches) first: from the config's
  (-1: 1) up to one row per micro-batch, counts that divide the mini-batch's rows."""
  section = methods.of(config).hparams(config)
  per_mini = step_episodes(config) // section.mini_batches
  start = max(int(section.micro_batches), 1)
  return [m for m in range(start, per_mini + 1) if per_mini % m == 0]
