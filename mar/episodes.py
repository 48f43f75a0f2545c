"""The typed batches that go from the rollout side to a learner, and row helpers over them.

`Episodes`: one dialogue per row in slot buffers [B, S] (prompt, attempts, feedback turns)
with its masks, per-turn verdicts [M, B] and reward. The rollout engine
(`mar.rollout.continuous`) writes them; PPO's learner (`mar.rl.ppo`) scores them; evaluation
reads their verdicts. `GroupBatch`: the group family's refined groups, every member under
its un-hinted prompt (`mar.algorithms.refined` builds it, `mar.rl.grpo` learns from it).
This module sits below both sides so that neither imports the other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REWARD_CORRECT = 1.0
REWARD_WRONG_BOX = -0.5
REWARD_NO_BOX = -1.0


class Episodes(NamedTuple):
  """Rollout output; [B, S] arrays are aligned with the dialogue slots."""

  tokens: jax.Array  # [B, S] int32
  valid: jax.Array  # [B, S] bool: prompt, attempts and feedback tokens
  action_mask: jax.Array  # [B, S] bool: model-sampled tokens (loss targets)
  feedback_mask: jax.Array  # [B, S] bool: inserted feedback spans
  attempt_id: jax.Array  # [B, S] int32: 1-based attempt of each action token, 0 elsewhere
  logprobs: jax.Array  # [B, S] f32: sampler log-probs of the action tokens
  reward: jax.Array  # [B] f32: episode reward (+1 / -0.5 / -1)
  last_action: jax.Array  # [B] int32: slot of the last action token (-1 if none)
  n_attempts: jax.Array  # [B] int32: attempts allowed
  attempts_used: jax.Array  # [B] int32
  correct_turn: jax.Array  # [M, B] bool: attempt t was made and was correct
  attempted_turn: jax.Array  # [M, B] bool: attempt t was made
  boxed_turn: jax.Array  # [M, B] bool: attempt t produced a closed box
  truncated: jax.Array  # [B] bool: the token budget ran out


class GroupBatch(NamedTuple):
  """The group family's learner input: N = groups x G members, [N, S] per token, [N] each."""

  tokens: Any  # [N, S] int32: un-hinted prompt + response, left-padded
  valid: Any  # [N, S] bool
  action_mask: Any  # [N, S] bool: response tokens in the loss
  advantages: Any  # [N] f32
  hinted: Any  # [N] bool: sampled under LTE's hint
  old_logp_hinted: Any  # [N, S] f32: log pi_old under the hinted prompt (0 elsewhere)
  sampler_logp: Any = None  # [N, S] f32: the sampler's log-probs (rollout/* metrics, TIS)
  old_logp: Any = None  # [N, S] f32: pi_old, computed first when there are several mini-batches

  def as_dict(self) -> dict:
    """The fields that are set, by name (what the learner's programs take)."""
    return {k: v for k, v in self._asdict().items() if v is not None}


# Episodes fields laid out [M, B] (turn-major); all others lead with the batch axis.
TURN_FIELDS = ("correct_turn", "attempted_turn", "boxed_turn")


def episode_reward(any_correct: jax.Array, any_box: jax.Array) -> jax.Array:
  """+1 if any attempt was correct, -0.5 if some box but none correct, -1 if never a box."""
  return jnp.where(any_correct, REWARD_CORRECT, jnp.where(any_box, REWARD_WRONG_BOX, REWARD_NO_BOX))


def first_rows(episodes: Episodes, n: int) -> Episodes:
  """The first n rows of a batch of episodes."""
  return Episodes(**{f: v[:, :n] if f in TURN_FIELDS else v[:n]
                     for f, v in episodes._asdict().items()})


def with_verdicts(episodes: Episodes, correct: np.ndarray, boxed: np.ndarray) -> Episodes:
  """A deferred single-turn rollout completed by host verdicts ([B] bool each)."""
  live = np.asarray(episodes.attempted_turn)[0]
  correct, boxed = np.asarray(correct, bool) & live, np.asarray(boxed, bool) & live
  reward = np.where(correct, REWARD_CORRECT, np.where(boxed, REWARD_WRONG_BOX, REWARD_NO_BOX))
  return episodes._replace(
      reward=reward.astype(np.float32), correct_turn=correct[None], boxed_turn=boxed[None],
      truncated=np.asarray(episodes.truncated) & ~correct)


def token_rewards(episodes: Episodes) -> jax.Array:
  """[B, S] rewards: the episode reward on its last action token, zero elsewhere."""
  s = episodes.tokens.shape[1]
  at_last = jnp.arange(s)[None, :] == episodes.last_action[:, None]
  return jnp.where(at_last, episodes.reward[:, None], 0.0)
