"""Continuous scheduling of a queue of episodes over B rows: no row waits for another.

The scheduler is the control half of the continuous rollout engine (`continuous.py`): per-row
modes and counters, the queue, the per-episode outcomes, and the one `lax.while_loop` that
drives a *policy* (the model half). Keeping it separate lets the same scheduling logic run
with the real model forward (`continuous.ModelPolicy`) or with scripted lengths and no model
at all (`ScriptedLengths`, for `bench/rollout.py --scripted`), so the step counts the bench
reports are those of the engine itself.

Row modes: FREE (no episode; waits for a refill), SAMPLE (decoding an attempt), FEED (its
feedback turn is fed through the decode step, one token per step), WAIT (its attempt ended;
it waits for the next verification check). Each loop iteration:

  1. check: when some row WAITs and (every `verify_every` decode steps, or no row is live),
     the policy verifies all WAIT rows at once (one host callback); wrong rows with attempts
     and budget left get their feedback turn (FEED), the others retire (FREE);
  2. refill: when some row is FREE, the queue is not empty and (at least `refill_rows` rows
     are free, or one has waited `refill_wait` decode steps, or no row is live), up to
     `refill_rows` free rows take the next queued episodes (the policy prefills them);
  3. decode: one step of every live (SAMPLE / FEED) row.

Single-turn episodes (no verifier: verdicts are given on the host afterwards) retire as soon
as their attempt ends.

Groups (DAPO's dynamic sampling, `group_size` > 0): the queue is groups of G consecutive
single-turn episodes, verified in the program. After each check the scheduler looks at the
queue's groups in order: a group is done when all its members are verified, informative when
their verdicts differ (or, `keep_none_pass`, when not all are correct: LTE hints a none-pass
group). Once some prefix of the queue is all done and holds `groups_needed` informative
groups, the step's groups are decided (`closed`): no new episode is admitted and the rows
still running are freed (their episodes lie past the prefix, none of them is trained). So
the decided groups are the same with any B; only the speculative work past them differs.

Per-turn semantics follow METHODS.md §1: the stop token
counts against the token budget, an attempt ends at a stop token, a fired stop predicate
(checked every `check_every` tokens and on the last one) or the end of the budget;
`attempts_left` drops by one per verified attempt, a wrong attempt goes on only with attempts
and budget left, and `truncated` marks a wrong attempt that used up the budget (with
`keep_stop_token`, run to EOS, verified in the program: a response the budget cut is wrong).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

FREE, SAMPLE, FEED, WAIT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """Static scheduling settings (hashable)."""

  max_attempts: int  # M
  token_budget: int  # sampled tokens shared by all attempts of an episode
  refill_rows: int  # R: rows one refill prefills (a static width)
  refill_wait: int = 16  # decode steps a free row may wait for R - 1 others
  verify_every: int = 8  # decode steps between verification checks (k)
  check_every: int = 1  # stop-predicate check interval, in tokens of an attempt
  deferred: bool = False  # no in-program verification (single-turn, verdicts on the host)
  # Single turn, run to EOS: a response whose last budgeted token is its stop token is
  # complete, not truncated (`spec.RolloutSpec.keep_stop_token`).
  keep_stop_token: bool = False
  group_size: int = 0  # G > 0: close the queue once `groups_needed` groups are informative
  groups_needed: int = 0
  keep_none_pass: bool = False  # a none-pass group counts as kept (LTE hints it)

  def __post_init__(self):
    if self.group_size and (self.deferred or self.max_attempts != 1 or self.groups_needed < 1):
      raise ValueError("ScheduleSpec: groups need in-program verification (deferred=False), "
                       f"max_attempts=1 and groups_needed >= 1, found {self}")
    for name in ("max_attempts", "token_budget", "refill_rows", "refill_wait", "verify_every",
                 "check_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"ScheduleSpec.{name}: expected >= 1, found {getattr(self, name)}")


class Control(NamedTuple):
  """Scheduler state: per row [B], per episode [Q] / [M, Q], and counters."""

  mode: jax.Array  # [B] int32
  seq: jax.Array  # [B] int32: episode in the row (Q when none)
  attempt: jax.Array  # [B] int32: 0-based attempt being made
  attempts_left: jax.Array  # [B] int32
  budget_left: jax.Array  # [B] int32
  num_new: jax.Array  # [B] int32: tokens sampled in the current attempt
  feed_tok: jax.Array  # [B, Lf] int32: the feedback turn being fed
  feed_idx: jax.Array  # [B] int32
  feed_len: jax.Array  # [B] int32
  idle_since: jax.Array  # [B] int32: decode step at which the row became free
  next_seq: jax.Array  # () int32: position in the queue
  step: jax.Array  # () int32: decode steps so far
  stats: dict  # int32 counters, see `_zero_stats`
  attempted: jax.Array  # [M, Q] bool
  correct: jax.Array  # [M, Q] bool
  boxed: jax.Array  # [M, Q] bool
  truncated: jax.Array  # [Q] bool
  stopped: jax.Array  # [B] bool: the row's attempt ended on a stop token
  closed: jax.Array  # () bool: the step's groups are decided; admit nothing more


def _zero_stats():
  z = jnp.zeros((), jnp.int32)
  return {"decode_steps": z, "sampled": z, "busy_row_steps": z, "prefill_rows": z,
          "prefill_calls": z, "checks": z, "verify_waits": z}


def live(ctl: Control) -> jax.Array:
  return (ctl.mode == SAMPLE) | (ctl.mode == FEED)


class Policy:
  """The model half of the engine (an interface; methods are traced inside the loop).

  fill(p, ctl, rows [R], seqs [R]) -> p: start episodes seqs in rows (rows == B: none).
  step(p, ctl) -> (p, ended [B], stopped [B]): one decode step of the live rows; `ended` marks
    SAMPLE rows whose attempt ended with this step (stop token, predicate, or budget / room),
    `stopped` those that ended on a stop token.
  verify(p, ctl, waiting [B]) -> (correct [B], boxed [B]) for the WAIT rows' attempts.
  feedback(p, ctl, go_on [B]) -> (tokens [B, Lf], lengths [B]) of the feedback turns.
  """


def _queue(n_attempts: jax.Array):
  """Queue order (real episodes first, in index order) and its length."""
  real = n_attempts > 0
  order = jnp.argsort(~real, stable=True).astype(jnp.int32)
  return order, real.sum().astype(jnp.int32)


def init_control(spec: ScheduleSpec, rows: int, n_attempts: jax.Array, feed_width: int):
  """Control with rows 0..min(B, n)-1 holding the first queued episodes (filled by the caller)."""
  q = n_attempts.shape[0]
  order, n = _queue(n_attempts)
  b_idx = jnp.arange(rows)
  first = b_idx < n
  seq = jnp.where(first, order[jnp.minimum(b_idx, q - 1)], q)
  m = spec.max_attempts
  ctl = Control(
      mode=jnp.where(first, SAMPLE, FREE).astype(jnp.int32),
      seq=seq.astype(jnp.int32),
      attempt=jnp.zeros((rows,), jnp.int32),
      attempts_left=jnp.where(first, n_attempts[jnp.minimum(seq, q - 1)], 0).astype(jnp.int32),
      budget_left=jnp.where(first, spec.token_budget, 0).astype(jnp.int32),
      num_new=jnp.zeros((rows,), jnp.int32),
      feed_tok=jnp.zeros((rows, feed_width), jnp.int32),
      feed_idx=jnp.zeros((rows,), jnp.int32),
      feed_len=jnp.zeros((rows,), jnp.int32),
      idle_since=jnp.zeros((rows,), jnp.int32),
      next_seq=jnp.minimum(n, rows).astype(jnp.int32),
      step=jnp.zeros((), jnp.int32),
      stats=_zero_stats(),
      attempted=jnp.zeros((m, q), bool),
      correct=jnp.zeros((m, q), bool),
      boxed=jnp.zeros((m, q), bool),
      truncated=jnp.zeros((q,), bool),
      stopped=jnp.zeros((rows,), bool),
      closed=jnp.zeros((), bool),
  )
  stats = dict(ctl.stats, prefill_rows=first.sum().astype(jnp.int32),
               prefill_calls=jnp.ones((), jnp.int32))
  return ctl._replace(stats=stats), order, n


def _bump(stats: dict, **inc) -> dict:
  return {k: v + inc[k].astype(jnp.int32) if k in inc else v for k, v in stats.items()}


def _verdicts(spec: ScheduleSpec, policy, p, ctl: Control, waiting, correct, boxed,
              complete=None):
  """Records the verdicts of the `waiting` rows; feedback turn or retirement for each.

  `complete` [B]: rows never marked truncated (a single-turn response ended by its EOS).
  """
  q = ctl.truncated.shape[0]
  seq_w = jnp.where(waiting, ctl.seq, q)  # q: dropped
  turn = jnp.minimum(ctl.attempt, spec.max_attempts - 1)
  correct, boxed = correct & waiting, boxed & waiting
  attempted = ctl.attempted.at[turn, seq_w].set(True, mode="drop")
  correct_t = ctl.correct.at[turn, seq_w].set(correct, mode="drop")
  boxed_t = ctl.boxed.at[turn, seq_w].set(boxed, mode="drop")
  attempts_left = ctl.attempts_left - waiting.astype(jnp.int32)
  go_on = waiting & ~correct & (attempts_left > 0) & (ctl.budget_left > 0)
  trunc_now = waiting & ~correct & (ctl.budget_left <= 0)
  if complete is not None:
    trunc_now &= ~complete
  truncated = ctl.truncated.at[jnp.where(trunc_now, ctl.seq, q)].set(True, mode="drop")
  ctl = ctl._replace(attempts_left=attempts_left, attempted=attempted, correct=correct_t,
                     boxed=boxed_t, truncated=truncated)
  if spec.deferred:  # single turn: no feedback ever
    fb_tok, fb_len = ctl.feed_tok, jnp.zeros_like(ctl.feed_len)
  else:
    fb_tok, fb_len = policy.feedback(p, ctl, go_on)
  fb_len = jnp.where(go_on, fb_len, 0)
  retire = waiting & ~go_on
  mode = jnp.where(go_on, jnp.where(fb_len > 0, FEED, SAMPLE),
                   jnp.where(retire, FREE, ctl.mode))
  return ctl._replace(
      mode=mode.astype(jnp.int32),
      seq=jnp.where(retire, q, ctl.seq),
      attempt=ctl.attempt + go_on.astype(jnp.int32),
      num_new=jnp.where(go_on, 0, ctl.num_new),
      feed_tok=jnp.where(go_on[:, None], fb_tok.astype(jnp.int32), ctl.feed_tok),
      feed_idx=jnp.where(go_on, 0, ctl.feed_idx),
      feed_len=jnp.where(go_on, fb_len, ctl.feed_len),
      idle_since=jnp.where(retire, ctl.step, ctl.idle_since),
  )


def group_verdicts(attempted, correct, group_size: int, keep_none_pass: bool = False):
  """Per group of G consecutive episodes ([Q] -> [Q // G]): (done, informative).

  done: every member verified; informative: done and the verdicts differ (keep_none_pass:
  done and not all correct). numpy or jax arrays.
  """
  g = group_size
  n = attempted.shape[0] // g * g
  att = attempted[:n].reshape(-1, g)
  hits = (correct[:n] & attempted[:n]).reshape(-1, g).sum(1)
  done = att.all(1)
  keep = (hits < g) if keep_none_pass else ((hits > 0) & (hits < g))
  return done, done & keep


def decided_prefix(done, informative, needed: int):
  """(closed, cutoff): whether a prefix of groups that are all done holds `needed`
  informative ones, and the shortest such prefix's length (all groups when not closed)."""
  prefix = jnp.cumprod(jnp.asarray(done).astype(jnp.int32)) > 0
  hit = jnp.cumsum(jnp.asarray(informative) & prefix) >= needed
  closed = hit.any()
  return closed, jnp.where(closed, jnp.argmax(hit) + 1, hit.shape[0]).astype(jnp.int32)


def _close_groups(spec: ScheduleSpec, ctl: Control) -> Control:
  """Closes the queue once its groups are decided: no more refills, running rows freed."""
  done, informative = group_verdicts(ctl.attempted[0], ctl.correct[0], spec.group_size,
                                     spec.keep_none_pass)
  closed = ctl.closed | decided_prefix(done, informative, spec.groups_needed)[0]
  q = ctl.truncated.shape[0]
  return ctl._replace(closed=closed, mode=jnp.where(closed, FREE, ctl.mode).astype(jnp.int32),
                      seq=jnp.where(closed, q, ctl.seq).astype(jnp.int32))


def _check(spec, policy, carry):
  p, ctl = carry
  waiting = ctl.mode == WAIT
  correct, boxed = policy.verify(p, ctl, waiting)
  ctl = ctl._replace(stats=_bump(ctl.stats, checks=jnp.ones((), jnp.int32)))
  complete = None
  if spec.keep_stop_token:  # run to EOS: a response cut by the budget is wrong (truncated)
    complete = ctl.stopped
    correct &= complete | (ctl.budget_left > 0)
  ctl = _verdicts(spec, policy, p, ctl, waiting, correct, boxed, complete)
  return p, _close_groups(spec, ctl) if spec.group_size else ctl


def _refill(spec, policy, order, n_queue, n_attempts, carry):
  p, ctl = carry
  b = ctl.mode.shape[0]
  q = n_attempts.shape[0]
  r = spec.refill_rows
  free = ctl.mode == FREE
  rows = jnp.nonzero(free, size=r, fill_value=b)[0].astype(jnp.int32)
  take = jnp.minimum(jnp.minimum(free.sum(), r), n_queue - ctl.next_seq)
  ok = jnp.arange(r) < take
  rows = jnp.where(ok, rows, b)
  seqs = jnp.where(ok, order[jnp.minimum(ctl.next_seq + jnp.arange(r), q - 1)], q)
  p = policy.fill(p, ctl, rows, seqs)
  set_rows = lambda a, v: a.at[rows].set(v, mode="drop")
  attempts = n_attempts[jnp.minimum(seqs, q - 1)].astype(jnp.int32)
  ctl = ctl._replace(
      mode=set_rows(ctl.mode, SAMPLE),
      seq=set_rows(ctl.seq, seqs),
      attempt=set_rows(ctl.attempt, 0),
      attempts_left=set_rows(ctl.attempts_left, attempts),
      budget_left=set_rows(ctl.budget_left, spec.token_budget),
      num_new=set_rows(ctl.num_new, 0),
      feed_idx=set_rows(ctl.feed_idx, 0),
      feed_len=set_rows(ctl.feed_len, 0),
      next_seq=ctl.next_seq + take,
      stats=_bump(ctl.stats, prefill_rows=take, prefill_calls=jnp.ones((), jnp.int32)),
  )
  return p, ctl


def _decode(spec, policy, carry):
  p, ctl = carry
  sampling = ctl.mode == SAMPLE
  feeding = ctl.mode == FEED
  p, ended, stopped = policy.step(p, ctl)
  ended = ended & sampling
  num_new = ctl.num_new + sampling.astype(jnp.int32)
  budget_left = ctl.budget_left - sampling.astype(jnp.int32)
  feed_idx = ctl.feed_idx + feeding.astype(jnp.int32)
  fed = feeding & (feed_idx >= ctl.feed_len)
  mode = jnp.where(ended, WAIT, jnp.where(fed, SAMPLE, ctl.mode))
  ctl = ctl._replace(
      mode=mode.astype(jnp.int32), num_new=jnp.where(fed, 0, num_new), budget_left=budget_left,
      stopped=jnp.where(ended, stopped, ctl.stopped),
      feed_idx=feed_idx, step=ctl.step + 1,
      stats=_bump(ctl.stats, decode_steps=jnp.ones((), jnp.int32), sampled=sampling.sum(),
                  busy_row_steps=(sampling | feeding).sum(),
                  verify_waits=(ctl.mode == WAIT).sum()))
  if spec.deferred:  # single turn: the attempt's verdict comes later, the row retires now
    zero = jnp.zeros_like(ended)
    ctl = _verdicts(spec, policy, p, ctl, ended, zero, zero,
                    complete=stopped if spec.keep_stop_token else None)
  return p, ctl


def run_from(spec: ScheduleSpec, policy, p, ctl: Control, order, n_queue, n_attempts):
  """The engine loop from an initial (policy state, Control); returns the final pair."""

  def need_check(ctl):
    waiting = (ctl.mode == WAIT).any()
    return waiting & ((ctl.step % spec.verify_every == 0) | ~live(ctl).any())

  def need_refill(ctl):
    free = ctl.mode == FREE
    oldest = jnp.min(jnp.where(free, ctl.idle_since, ctl.step))
    ready = ((free.sum() >= spec.refill_rows) | (ctl.step - oldest >= spec.refill_wait)
             | ~live(ctl).any())
    return free.any() & (ctl.next_seq < n_queue) & ready & ~ctl.closed

  def body(carry):
    p, ctl = carry
    if not spec.deferred:
      carry = jax.lax.cond(need_check(ctl), lambda c: _check(spec, policy, c), lambda c: c,
                           carry)
    carry = jax.lax.cond(need_refill(carry[1]),
                         lambda c: _refill(spec, policy, order, n_queue, n_attempts, c),
                         lambda c: c, carry)
    return jax.lax.cond(live(carry[1]).any(), lambda c: _decode(spec, policy, c),
                        lambda c: c, carry)

  def cond(carry):
    ctl = carry[1]
    return (ctl.mode != FREE).any() | ((ctl.next_seq < n_queue) & ~ctl.closed)

  return jax.lax.while_loop(cond, body, (p, ctl))


# ----- scripted lengths (no model): the bench's and the tests' step counts ---------------------


class ScriptedLengths(Policy):
  """Attempt t of episode q lasts lengths[q, t] sampled tokens (its last ends the attempt);
  verdicts[q, t] says whether it is correct (always boxed); feedback turns `feedback_len`."""

  def __init__(self, lengths: jax.Array, verdicts: jax.Array, feedback_len: int):
    self.lengths, self.verdicts, self.feedback_len = lengths, verdicts, feedback_len

  def _at(self, table, ctl):
    q, m = table.shape
    return table[jnp.minimum(ctl.seq, q - 1), jnp.minimum(ctl.attempt, m - 1)]

  def fill(self, p, ctl, rows, seqs):
    return p

  def step(self, p, ctl):
    n = ctl.num_new + 1
    ended = (n >= self._at(self.lengths, ctl)) | (ctl.budget_left - 1 <= 0)
    return p, ended, jnp.zeros_like(ended)

  def verify(self, p, ctl, waiting):
    return self._at(self.verdicts, ctl) & waiting, waiting

  def feedback(self, p, ctl, go_on):
    b = go_on.shape[0]
    return (jnp.zeros((b, 1), jnp.int32), jnp.full((b,), self.feedback_len, jnp.int32))


def scripted_counts(spec: ScheduleSpec, rows: int, lengths, verdicts, n_attempts,
                    feedback_len: int = 0) -> dict:
  """Runs the engine's scheduler on scripted lengths; returns its counters as ints."""
  policy = ScriptedLengths(jnp.asarray(lengths, jnp.int32), jnp.asarray(verdicts, bool),
                           feedback_len)

  @jax.jit
  def go(n_attempts):
    ctl, order, n = init_control(spec, rows, n_attempts, 1)
    _, ctl = run_from(spec, policy, (), ctl, order, n, n_attempts)
    return ctl

  ctl = jax.device_get(go(jnp.asarray(n_attempts, jnp.int32)))
  out = {k: int(v) for k, v in ctl.stats.items()}
  out["attempts_used"] = ctl.attempted.sum(0)
  out["correct"] = ctl.correct.any(0)
  out["truncated"] = ctl.truncated
  out["closed"] = bool(ctl.closed)
  return out
