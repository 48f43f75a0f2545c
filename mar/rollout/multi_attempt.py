"""The multi-attempt episode as one jitted program: a `lax.scan` over turns.

Each turn decodes one attempt for every live row (the sampler's while-loop decode, ending
at the attempt's first closed `\\boxed{}` or a stop token), verifies all attempts of the
turn with ONE host callback, and appends the pre-tokenized feedback turn to the live KV
cache of the rows that were wrong and have attempts left. The cache is never re-filled.

The cache slot layout is the dialogue layout (see `mar.sampling`): slot s of row b holds
the s-th token of that row's dialogue. Masks are written from what this code inserted,
never by searching token ids: `action_mask` marks sampled tokens, `feedback_mask` the
inserted feedback spans (from their leading `<|im_end|>` to `<|im_start|>assistant\\n`).
A stop token the model emitted is rewound and never kept: the feedback supplies the
`<|im_end|>` and the final attempt ends without one (METHODS.md §1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mar import sampling
from mar.models.config import QwenConfig

REWARD_CORRECT = 1.0
REWARD_WRONG_BOX = -0.5
REWARD_NO_BOX = -1.0


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """Static shape and sampling settings of one rollout program (one compile each)."""

  max_attempts: int  # M: the scan length
  token_budget: int  # generated tokens shared by all attempts of an episode
  cache_len: int  # S: prompt bucket + budget + feedback turns
  sampling: sampling.SamplingParams
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


# Episodes fields laid out [M, B] (turn-major); all others lead with the batch axis.
TURN_FIELDS = ("correct_turn", "attempted_turn", "boxed_turn")


class _Carry(NamedTuple):
  state: sampling.SamplerState
  active: jax.Array  # [B] bool: episode still going
  attempts_left: jax.Array  # [B] int32
  budget_left: jax.Array  # [B] int32
  action_mask: jax.Array
  feedback_mask: jax.Array
  attempt_id: jax.Array


# verify_fn(example_ids [B], tokens [B, S], start [B], end [B], live [B]) -> (correct [B], boxed [B])
VerifyFn = Callable[..., tuple[np.ndarray, np.ndarray]]


def _span_mask(shape, start, end):
  """[B, S] bool, True on slots start[b] <= s < end[b]."""
  s = jnp.arange(shape[1])[None, :]
  return (s >= start[:, None]) & (s < end[:, None])


def _verify_on_host(verify_fn: VerifyFn, example_ids, tokens, start, end, live, turn):
  out_shape = (
      jax.ShapeDtypeStruct(live.shape, jnp.bool_),
      jax.ShapeDtypeStruct(live.shape, jnp.bool_),
  )

  def host(ids, toks, st, en, lv, t):
    correct, boxed = verify_fn(np.asarray(ids), np.asarray(toks), np.asarray(st),
                               np.asarray(en), np.asarray(lv), int(t))
    return np.asarray(correct, bool), np.asarray(boxed, bool)

  correct, boxed = jax.pure_callback(host, out_shape, example_ids, tokens, start, end, live,
                                     turn)
  return correct & live, boxed & live


def _hint_feedback_on_host(verify_fn, attempts_left, go_on, width: int):
  """Hybrid mode: per-row feedback turns with the wrong answers so far, from the host."""
  out_shape = (jax.ShapeDtypeStruct((go_on.shape[0], width), jnp.int32),
               jax.ShapeDtypeStruct(go_on.shape, jnp.int32))
  host = lambda a, g: verify_fn.hint_feedback(np.asarray(a), np.asarray(g), width)
  return jax.pure_callback(host, out_shape, attempts_left, go_on)


def _turn(config, params, spec, stop_predicate, verify_fn, decode_fn, example_ids, feedback,
          carry, turn):
  """One attempt for every live row; returns the new carry and per-turn outcomes."""
  fb_tokens, fb_lengths = (jnp.asarray(x) for x in feedback)
  state, live = carry.state, carry.active
  start = state.pos
  state = decode_fn(
      config, params, state,
      max_new=jnp.where(live, carry.budget_left, 0),
      sampling=spec.sampling, stop_ids=spec.stop_ids,
      stop_predicate=stop_predicate, check_every=spec.check_every,
  )
  stopped = live & (state.finish == sampling.FINISH_STOP_TOKEN)
  budget_left = carry.budget_left - jnp.where(live, state.num_new, 0)
  if not spec.keep_stop_token:
    # The stop token is dropped: the feedback's leading <|im_end|> (or nothing) replaces it.
    state = sampling.rewind(state, stopped.astype(jnp.int32))
  end = state.pos
  span = _span_mask(state.tokens.shape, start, end) & live[:, None]
  action_mask = carry.action_mask | span
  attempt_id = jnp.where(span, turn + 1, carry.attempt_id)

  if verify_fn is None:  # deferred: single-turn rollouts are verified after the program
    correct = boxed = jnp.zeros_like(live)
  else:
    correct, boxed = _verify_on_host(verify_fn, example_ids, state.tokens, start, end, live, turn)
  attempts_left = carry.attempts_left - live.astype(jnp.int32)
  go_on = live & ~correct & (attempts_left > 0) & (budget_left > 0)

  if spec.hint_feedback_len:
    fb_turn, fb_len = _hint_feedback_on_host(verify_fn, attempts_left, go_on,
                                             spec.hint_feedback_len)
  else:
    fb_turn, fb_len = fb_tokens[attempts_left], fb_lengths[attempts_left]
  fb_len = jnp.where(go_on, fb_len, 0)
  fb_start = state.pos
  state = sampling.append(config, params, state, fb_turn, fb_len)
  feedback_mask = carry.feedback_mask | _span_mask(state.tokens.shape, fb_start, fb_start + fb_len)

  new = _Carry(state, go_on, attempts_left, budget_left, action_mask, feedback_mask, attempt_id)
  truncated_now = live & ~correct & (budget_left <= 0)
  if spec.keep_stop_token:  # a response whose last budgeted token is its EOS is complete
    truncated_now &= ~stopped
  return new, (correct, live, boxed, truncated_now)


def episode_reward(any_correct: jax.Array, any_box: jax.Array) -> jax.Array:
  """+1 if any attempt was correct, -0.5 if some box but none correct, -1 if never a box."""
  return jnp.where(any_correct, REWARD_CORRECT, jnp.where(any_box, REWARD_WRONG_BOX, REWARD_NO_BOX))


def rollout(
    config: QwenConfig,
    params,
    spec: RolloutSpec,
    stop_predicate,
    verify_fn: VerifyFn | None,
    prompt_tokens: jax.Array,  # [B, P] left-padded
    prompt_mask: jax.Array,  # [B, P] bool
    n_attempts: jax.Array,  # [B] int32 in 1..M
    example_ids: jax.Array,  # [B] int32, host-side index of the gold answer
    feedback_tokens: jax.Array,  # [M, Lf] int32, row n = feedback with n attempts left
    feedback_lengths: jax.Array,  # [M] int32
    key: jax.Array,
    decode_fn: Callable = sampling.decode,
) -> Episodes:
  """Runs a batch of multi-attempt episodes (jit with config/spec/predicate/verify static).

  `decode_fn` is the sampler's decode; tests swap in a scripted policy with its signature.
  `verify_fn=None` runs no callback and leaves every verdict False (and `truncated` set for
  any row out of budget): a single-turn rollout never branches on a verdict, so the host can
  verify it afterwards (`with_verdicts`) while the device samples the next batch.
  """
  b = prompt_tokens.shape[0]
  state = sampling.prefill(config, params, prompt_tokens, prompt_mask, spec.cache_len,
                           key=key, stop_predicate=stop_predicate)
  s = spec.cache_len
  carry = _Carry(
      state=state,
      active=n_attempts > 0,
      attempts_left=n_attempts.astype(jnp.int32),
      budget_left=jnp.full((b,), spec.token_budget, jnp.int32),
      action_mask=jnp.zeros((b, s), bool),
      feedback_mask=jnp.zeros((b, s), bool),
      attempt_id=jnp.zeros((b, s), jnp.int32),
  )
  turn_fn = lambda c, t: _turn(config, params, spec, stop_predicate, verify_fn, decode_fn,
                               example_ids, (feedback_tokens, feedback_lengths), c, t)
  carry, (correct_t, live_t, boxed_t, trunc_t) = jax.lax.scan(
      turn_fn, carry, jnp.arange(spec.max_attempts))

  any_correct = correct_t.any(0)
  any_box = boxed_t.any(0)
  slots = jnp.arange(s)[None, :]
  last_action = jnp.max(jnp.where(carry.action_mask, slots, -1), axis=1)
  st = carry.state
  return Episodes(
      tokens=st.tokens,
      valid=st.cache.valid,
      action_mask=carry.action_mask,
      feedback_mask=carry.feedback_mask,
      attempt_id=carry.attempt_id,
      logprobs=jnp.where(carry.action_mask, st.logprobs, 0.0),
      reward=episode_reward(any_correct, any_box),
      last_action=last_action,
      n_attempts=n_attempts,
      attempts_used=live_t.sum(0).astype(jnp.int32),
      correct_turn=correct_t,
      attempted_turn=live_t,
      boxed_turn=boxed_t,
      truncated=trunc_t.any(0),
  )


def concat_episodes(parts: list[Episodes]) -> Episodes:
  """Episodes of several rollout programs as one batch, in order.

  Programs of different prompt buckets have different cache lengths S: the shorter ones'
  [B, S] fields are right-padded with empty slots (invalid, no action, token 0).
  """
  if len(parts) == 1:
    return parts[0]
  width = max(p.tokens.shape[1] for p in parts)

  def widen(x, f):
    if f in TURN_FIELDS or x.ndim < 2 or x.shape[1] == width:
      return x
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))

  return Episodes(**{
      f: jnp.concatenate([widen(getattr(p, f), f) for p in parts],
                         axis=1 if f in TURN_FIELDS else 0)
      for f in Episodes._fields})


def first_rows(episodes: Episodes, n: int) -> Episodes:
  """The first n rows of a batch of episodes."""
  return Episodes(**{f: v[:, :n] if f in TURN_FIELDS else v[:n]
                     for f, v in episodes._asdict().items()})


def take_rows(episodes: Episodes, rows) -> Episodes:
  """The episodes of `rows` (indices into the batch), in that order."""
  return Episodes(**{f: jnp.take(v, rows, axis=1 if f in TURN_FIELDS else 0)
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
