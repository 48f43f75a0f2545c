"""The continuous rollout engine: a queue of Q episodes over B rows in one jitted program.

No row waits for another. When a row's episode ends, the next queued episode enters that row
inside the program (`sampling.refill.fill_rows`: up to R freed rows per refill, under
`lax.cond`, each prompt prefilled alone at its own prompt width); a multi-attempt row whose
attempt ended is verified at the next check (one host callback for every row that ended an
attempt since the last one) and, if wrong with attempts and budget left, its feedback turn is
fed through the decode step and it goes on alone. The schedule is `mar.rollout.schedule`; this
module is its model half (`ModelPolicy`).

Why two ways in: a prompt (P ~ 100-1,000 tokens) enters by a prefill of its own (W tokens in
one forward, W the smallest prompt width >= its length; fed one token per decode step it would
hold its row for P steps), while a feedback turn (~25 tokens) is fed through the decode step one
token per step: about 5 % of a 400-token attempt, no extra forward over the rows' live caches,
and no branch. A prompt is prefilled alone rather than with the rows that refill with it, so
prefill computes its own tokens (1.44x the real ones on the MATH training prompts with the
powers-of-two widths, where a batched prefill at the queue's width computes R x P per refill)
and its cache does not depend on its companions. (Chosen on these counts; not timed against
the alternatives on an accelerator.)

Outputs are indexed by episode, not by row: `Episodes` [Q, S] in the dialogue slot layout
(`mar.rollout.spec`: slot s of episode q holds its s-th token, prompt left-padded in slots
0..P-1), written token by token at (episode, slot). Each token's PRNG key comes from (episode,
token index) (`sampling.refill.token_keys`), so an episode's sample does not depend on the row
or step it ran in: the same queue gives the same episodes with any B.

Masks and rewards follow METHODS.md §1: a stop token the model
samples counts against the budget but is never written (the feedback brings its own
`<|im_end|>`, and the final attempt ends without one) unless `keep_stop_token` (single-turn
run-to-EOS: the EOS is a trained action); `action_mask` marks sampled tokens,
`feedback_mask` the fed feedback turns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np

from mar import episodes as episodes_lib
from mar import sampling
from mar.models import model as qwen
from mar.rollout import schedule
from mar.rollout import spec as spec_lib
from mar.sampling import refill


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """Static settings of one continuous rollout program (one compile each)."""

  rollout: spec_lib.RolloutSpec  # turns, budget, cache length, sampling, stop ids, hints
  rows: int  # B: rows decoded together
  refill_rows: int = 0  # R: rows one refill prefills; 0: max(1, B // 16)
  refill_wait: int = 16  # decode steps a free row waits for more rows to free up
  verify_every: int = 8  # decode steps between verification checks
  unroll: bool = True  # decode over per-layer weights (see `mar.sampling.sampler`)
  # Widths a prompt is prefilled at (each alone, the smallest that holds it; P when empty).
  prompt_widths: tuple[int, ...] = ()
  # Dynamic sampling (`schedule` module docstring): groups of group_size queued episodes;
  # the queue closes once groups_needed of them are informative. 0: off.
  group_size: int = 0
  groups_needed: int = 0
  keep_none_pass: bool = False

  def schedule(self, deferred: bool) -> schedule.ScheduleSpec:
    r = self.rollout
    return schedule.ScheduleSpec(
        max_attempts=r.max_attempts, token_budget=r.token_budget,
        refill_rows=min(self.refill_rows or max(1, self.rows // 16), self.rows),
        refill_wait=self.refill_wait, verify_every=self.verify_every,
        check_every=r.check_every, deferred=deferred, keep_stop_token=r.keep_stop_token,
        group_size=self.group_size, groups_needed=self.groups_needed,
        keep_none_pass=self.keep_none_pass)


class Outputs(NamedTuple):
  """Per-episode dialogue arrays [Q, S]."""

  tokens: jax.Array
  valid: jax.Array
  logprobs: jax.Array
  action: jax.Array
  feedback: jax.Array
  attempt_id: jax.Array


class RowState(NamedTuple):
  """The model half's state: the rows' cache and next-token logits, and the outputs."""

  cache: qwen.KVCache
  pos: jax.Array  # [B] next free slot
  rope_pos: jax.Array  # [B]
  logits: jax.Array  # [B, V]
  pred: Any  # stop-predicate state (() without one)
  attempt_start: jax.Array  # [B] slot of the current attempt's first token
  out: Outputs


# choose_fn(logits [B, V], keys [B], ctl) -> (tokens [B], logprobs [B], end_after [B] bool):
# tests replace sampling by a scripted policy; end_after ends the attempt after the token.
ChooseFn = Callable[..., tuple]


class ModelPolicy(schedule.Policy):
  """Real model steps for `schedule.run_from` (all arrays traced; the object is rebuilt per trace)."""

  def __init__(self, config, params, spec: EngineSpec, stop_predicate, verify_fn, prompts,
               prompt_mask, feedback, key, choose_fn: ChooseFn | None = None, first=0,
               total: int | None = None):
    self.config, self.params, self.spec = config, params, spec
    self.pred, self.verify_fn = stop_predicate, verify_fn
    self.prompts, self.prompt_mask = prompts, prompt_mask
    self.fb_tokens, self.fb_lengths = feedback
    self.key, self.choose_fn = key, choose_fn
    self.q = prompts.shape[0]
    # This queue is episodes first..first+q-1 of a queue of `total` split over data shards.
    self.first, self.total = first, self.q if total is None else total

  def _global(self, seqs):
    """Episode ids in the whole queue (keys, verifier answers): `total` for no episode."""
    return jnp.where(seqs < self.q, seqs + self.first, self.total).astype(jnp.int32)

  # -- filling rows --------------------------------------------------------------------------

  def _prompt(self, seqs):
    s = jnp.minimum(seqs, self.q - 1)
    ok = (seqs < self.q)[:, None]
    return self.prompts[s], self.prompt_mask[s] & ok

  def _write_prompts(self, out: Outputs, seqs, toks, mask) -> Outputs:
    s = out.tokens.shape[1]
    pad = lambda a: jnp.pad(a, ((0, 0), (0, s - a.shape[1])))
    return out._replace(tokens=out.tokens.at[seqs].set(pad(toks), mode="drop"),
                        valid=out.valid.at[seqs].set(pad(mask), mode="drop"))

  def start(self, ctl: schedule.Control) -> RowState:
    """Empty outputs and a fresh cache whose rows `init_control` assigned are filled as refills."""
    r = self.spec.rollout
    b, q, s = ctl.seq.shape[0], self.q, r.cache_len
    cache = qwen.init_cache(self.config, b, s)
    if qwen.is_unstacked(self.params["layers"]):
      cache = qwen.unstack_cache(cache)
    zeros = lambda dt: jnp.zeros((q, s), dt)
    out = Outputs(tokens=zeros(jnp.int32), valid=zeros(bool), logprobs=zeros(jnp.float32),
                  action=zeros(bool), feedback=zeros(bool), attempt_id=zeros(jnp.int32))
    pred = () if self.pred is None else self.pred.init(b)
    row_zeros = jnp.zeros((b,), jnp.int32)
    p = RowState(cache=cache, pos=row_zeros, rope_pos=row_zeros,
                 logits=jnp.zeros((b, self.config.vocab_size), jnp.float32), pred=pred,
                 attempt_start=row_zeros, out=out)
    rows = jnp.where(ctl.seq < q, jnp.arange(b), b).astype(jnp.int32)
    return self.fill(p, ctl, rows, ctl.seq)

  def fill(self, p: RowState, ctl, rows, seqs) -> RowState:
    toks, mask = self._prompt(seqs)
    cache, logits, rope = refill.fill_rows(self.config, self.params, p.cache, rows, toks, mask,
                                           self.spec.prompt_widths)
    width = toks.shape[1]
    set_rows = lambda a, v: a.at[rows].set(v, mode="drop")
    return p._replace(
        cache=cache, pos=set_rows(p.pos, width), rope_pos=set_rows(p.rope_pos, rope),
        logits=set_rows(p.logits, logits), attempt_start=set_rows(p.attempt_start, width),
        out=self._write_prompts(p.out, seqs, toks, mask))

  # -- one decode step -----------------------------------------------------------------------

  def _choose(self, p: RowState, ctl):
    r = self.spec.rollout
    index = r.token_budget - ctl.budget_left  # tokens this episode sampled so far
    seq = self._global(ctl.seq)
    keys = refill.token_keys(self.key, seq, index)
    if self.choose_fn is not None:
      return self.choose_fn(p.logits, keys, ctl._replace(seq=seq))
    tok, lp = refill.sample_rows(p.logits, keys, r.sampling)
    return tok, lp, jnp.zeros(tok.shape, bool)

  def step(self, p: RowState, ctl):
    r = self.spec.rollout
    b, s = p.pos.shape[0], r.cache_len
    rows = jnp.arange(b)
    sampling_ = ctl.mode == schedule.SAMPLE
    feeding = ctl.mode == schedule.FEED
    fresh = sampling_ & (ctl.num_new == 0)  # first token of an attempt
    attempt_start = jnp.where(fresh, p.pos, p.attempt_start)
    pred = p.pred
    if self.pred is not None:  # the predicate sees the current attempt only
      init = self.pred.init(b)
      pred = jax.tree.map(
          lambda i, o: jnp.where(fresh.reshape((b,) + (1,) * (i.ndim - 1)), i, o), init, pred)

    tok, lp, end_after = self._choose(p, ctl)
    fed = ctl.feed_tok[rows, jnp.clip(ctl.feed_idx, 0, ctl.feed_tok.shape[1] - 1)]
    tok = jnp.where(feeding, fed, tok).astype(jnp.int32)
    lp = jnp.where(sampling_, lp, 0.0)
    stop_hit = sampling_ & sampling.sampler._is_stop(tok, r.stop_ids)  # pylint: disable=protected-access
    # A sampled stop token is dropped (the feedback brings its own) unless the spec keeps it.
    write = (sampling_ | feeding) & (~stop_hit | r.keep_stop_token)

    h, cache = qwen.forward_cached(self.config, self.params, tok[:, None], p.rope_pos[:, None],
                                   write[:, None], p.cache, p.pos)
    logits = jnp.where(write[:, None],
                       qwen.logits_from_hidden(self.config, self.params, h[:, 0]), p.logits)
    seq = jnp.where(write, ctl.seq, self.q)  # q: dropped
    slot = jnp.where(write, p.pos, s)
    put = lambda a, v: a.at[seq, slot].set(v, mode="drop")
    o = p.out
    out = Outputs(tokens=put(o.tokens, tok), valid=put(o.valid, True),
                  logprobs=put(o.logprobs, lp), action=put(o.action, sampling_),
                  feedback=put(o.feedback, feeding),
                  attempt_id=put(o.attempt_id, jnp.where(sampling_, ctl.attempt + 1, 0)))
    inc = write.astype(jnp.int32)
    pos = p.pos + inc

    n = ctl.num_new + sampling_.astype(jnp.int32)
    out_of_room = sampling_ & ((ctl.budget_left - 1 <= 0) | (pos >= s))
    pred_stop = sampling_ & end_after & ~stop_hit
    if self.pred is not None:
      pred, fired = self.pred.update(pred, tok, sampling_)
      at_check = (n % r.check_every == 0) | stop_hit | out_of_room
      pred_stop |= sampling_ & fired & at_check & ~stop_hit
    ended = stop_hit | pred_stop | out_of_room
    return p._replace(cache=cache, pos=pos, rope_pos=p.rope_pos + inc, logits=logits,
                      pred=pred, attempt_start=attempt_start, out=out), ended, stop_hit

  # -- verification and feedback ---------------------------------------------------------------

  def verify(self, p: RowState, ctl, waiting):
    q = self.q
    seq = jnp.minimum(ctl.seq, q - 1)
    tokens = p.out.tokens[seq]
    out_shape = (jax.ShapeDtypeStruct(waiting.shape, jnp.bool_),
                 jax.ShapeDtypeStruct(waiting.shape, jnp.bool_))
    fn = self.verify_fn

    def host(ids, toks, st, en, lv, turn):
      correct, boxed = fn.verify_rows(np.asarray(ids), np.asarray(toks), np.asarray(st),
                                      np.asarray(en), np.asarray(lv), np.asarray(turn))
      return np.asarray(correct, bool), np.asarray(boxed, bool)

    correct, boxed = jax.pure_callback(host, out_shape, self._global(seq), tokens,
                                       p.attempt_start, p.pos, waiting, ctl.attempt)
    return correct & waiting, boxed & waiting

  def feedback(self, p: RowState, ctl, go_on):
    r = self.spec.rollout
    width = ctl.feed_tok.shape[1]
    if r.hint_feedback_len:
      # One [B, width + 1] result (the tokens, then the length): JAX's TPU lowering of a
      # callback (host send / recv) inside shard_map gave its rank-2 and rank-1 results each
      # other's shardings ("sharding doesn't match tensor rank"), so hybrid_qwen's rollout
      # did not compile for TPU.
      fn = self.verify_fn

      def host(sq, a, g):
        toks, lengths = fn.hint_feedback_rows(np.asarray(sq), np.asarray(a), np.asarray(g),
                                              width)
        return np.concatenate([np.asarray(toks, np.int32),
                               np.asarray(lengths, np.int32)[:, None]], axis=1)

      shape = jax.ShapeDtypeStruct((go_on.shape[0], width + 1), jnp.int32)
      out = jax.pure_callback(host, shape, self._global(ctl.seq), ctl.attempts_left, go_on)
      return out[:, :width], out[:, width]
    toks = jnp.pad(self.fb_tokens, ((0, 0), (0, width - self.fb_tokens.shape[1])))
    left = jnp.clip(ctl.attempts_left, 0, toks.shape[0] - 1)
    return toks[left], self.fb_lengths[left]


def feed_width(spec: EngineSpec, feedback_tokens) -> int:
  return max(int(feedback_tokens.shape[1]), spec.rollout.hint_feedback_len, 1)


def rollout(config, params, spec: EngineSpec, stop_predicate, verify_fn, prompt_tokens,
            prompt_mask, n_attempts, feedback_tokens, feedback_lengths, key,
            choose_fn: ChooseFn | None = None, mesh=None):
  """Runs Q episodes (prompts [Q, P] left-padded, n_attempts [Q], 0 = skip) over B rows.

  Trace it inside a jit with config / spec / predicate / verify_fn / choose_fn / mesh static.
  verify_fn None: single-turn, verified on the host afterwards (`episodes_lib.with_verdicts`), needs
  max_attempts == 1. Otherwise an `AttemptVerifier` (its `verify_rows`, `hint_feedback_rows`).
  With `mesh` (the sampling layout: D = its 'data' size > 1, no 'fsdp' split) and B, Q
  multiples of D, each data shard runs its own engine over B / D rows and a contiguous
  sub-queue of Q / D episodes (`split_over_data`), keys and verifier lookups by global
  episode id, so the episodes are those of one engine; stats: decode_steps is the longest
  shard's, the other counters are summed over shards.
  Returns (Episodes [Q, ...], stats: dict of int32 counters, see `schedule._zero_stats`).
  """
  r = spec.rollout
  if verify_fn is None and (r.max_attempts != 1 or r.hint_feedback_len):
    raise ValueError("continuous.rollout: verify_fn=None needs a single-turn spec "
                     f"(max_attempts=1, no hints), found {r}")
  if spec.unroll:
    params = qwen.unstack_layers(params)
  key = sampling.sampler._as_key(key)  # pylint: disable=protected-access
  args = (jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask, bool),
          jnp.asarray(n_attempts, jnp.int32))
  q = args[0].shape[0]
  feedback = (jnp.asarray(feedback_tokens, jnp.int32), jnp.asarray(feedback_lengths, jnp.int32))
  run = lambda spec_, first, params_, *args_: _run_queue(  # pylint: disable=g-long-lambda
      config, params_, spec_, stop_predicate, verify_fn, *args_, feedback, key, choose_fn,
      first, q)
  # Groups are decided over the whole queue: one engine (a shard would see its sub-queue).
  if spec.group_size or not split_over_data(mesh, spec.rows, q,
                                            callbacks=verify_fn is not None):
    return run(spec, 0, params, *args)
  d = mesh.shape["data"]
  local = dataclasses.replace(spec, rows=spec.rows // d)

  def per_shard(params_, *args_):
    episodes_, stats = run(local, jax.lax.axis_index("data") * (q // d), params_, *args_)
    # The program lasts as long as its longest shard; the other counters add up.
    stats = {k: jax.lax.pmax(v, "data") if k == "decode_steps" else jax.lax.psum(v, "data")
             for k, v in stats.items()}
    return episodes_, stats

  rows, rep = PartitionSpec("data"), PartitionSpec()
  out_specs = (episodes_lib.Episodes(**{f: PartitionSpec(None, "data") if f in episodes_lib.TURN_FIELDS else rows
                              for f in episodes_lib.Episodes._fields}), rep)
  # 'tensor' (if > 1) stays automatic inside each shard, as in `sampling.sampler._decode`.
  manual = {"data"} if mesh.shape.get("tensor", 1) > 1 else frozenset(mesh.axis_names)
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(jax.tree.map(lambda _: rep, params), rows, rows, rows),
                       out_specs=out_specs, axis_names=manual, check_vma=False)(params, *args)


def split_over_data(mesh, rows: int, queue: int, callbacks: bool) -> bool:
  """Whether the engine runs one sub-queue per 'data' shard of `mesh` (see `rollout`).

  Not with host callbacks (in-program verification) and 'tensor' > 1: JAX runs a callback
  inside `shard_map` only when every mesh axis is manual, and 'tensor' stays automatic. That
  case runs one engine over all rows (each data shard computes every row).
  """
  if not sampling.sampler._rows_local(mesh):  # pylint: disable=protected-access
    return False
  if callbacks and mesh.shape.get("tensor", 1) > 1:
    return False
  d = mesh.shape["data"]
  return rows % d == 0 and queue % d == 0


def _run_queue(config, params, spec: EngineSpec, stop_predicate, verify_fn, prompt_tokens,
               prompt_mask, n_attempts, feedback, key, choose_fn, first, total):
  """One engine over spec.rows rows; its queue is episodes first.. of a queue of `total`."""
  deferred = verify_fn is None
  sspec = spec.schedule(deferred)
  policy = ModelPolicy(config, params, spec, stop_predicate, verify_fn, prompt_tokens,
                       prompt_mask, feedback, key, choose_fn, first=first, total=total)
  ctl, order, n = schedule.init_control(sspec, spec.rows, n_attempts,
                                        feed_width(spec, feedback[0]))
  p = policy.start(ctl)
  p, ctl = schedule.run_from(sspec, policy, p, ctl, order, n, n_attempts)
  return episodes(p.out, ctl, n_attempts), ctl.stats


def episodes(out: Outputs, ctl: schedule.Control, n_attempts) -> episodes_lib.Episodes:
  s = out.tokens.shape[1]
  slots = jnp.arange(s)[None]
  return episodes_lib.Episodes(
      tokens=out.tokens, valid=out.valid, action_mask=out.action, feedback_mask=out.feedback,
      attempt_id=out.attempt_id, logprobs=jnp.where(out.action, out.logprobs, 0.0),
      reward=episodes_lib.episode_reward(ctl.correct.any(0), ctl.boxed.any(0)),
      last_action=jnp.max(jnp.where(out.action, slots, -1), axis=1),
      n_attempts=n_attempts, attempts_used=ctl.attempted.sum(0).astype(jnp.int32),
      correct_turn=ctl.correct, attempted_turn=ctl.attempted, boxed_turn=ctl.boxed,
      truncated=ctl.truncated)


def utilization(stats: dict, rows: int) -> float:
  """Sampled tokens / (rows x decode steps)."""
  steps = int(stats["decode_steps"])
  return float(stats["sampled"]) / (rows * steps) if steps else 0.0
