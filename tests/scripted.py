"""Scripted policies: decode functions with the sampler's signature that emit fixed tokens.

They write through the real `sampling.append`, so the KV cache, slots and masks are the real
ones; only the choice of tokens is scripted. Used to drive the real rollout deterministically.
"""

import jax
import jax.numpy as jnp

from mar import sampling


def counting_predicate():
  """Stop-predicate stand-in whose per-row state counts the attempts made so far."""
  return sampling.StopPredicate(
      (), lambda tables, batch: jnp.zeros((batch,), jnp.int32),
      lambda tables, state, token, live: (state, jnp.zeros_like(live)), "count")


def _emit(config, params, state, toks, full, max_new, stop_ids, logprob=-0.25):
  """Appends toks[b, :min(full[b], max_new[b])] for live rows; sets finish like decode."""
  b = state.pos.shape[0]
  rows = jnp.arange(b)
  live = max_new > 0
  n = jnp.where(live, jnp.minimum(full, max_new), 0)
  start = state.pos
  state = sampling.append(config, params, state, toks, n)
  slots = jnp.arange(state.tokens.shape[1])[None]
  written = (slots >= start[:, None]) & (slots < state.pos[:, None])
  last = toks[rows, jnp.maximum(n - 1, 0)]
  is_stop = live & (n > 0) & jnp.isin(last, jnp.asarray(stop_ids))
  finish = jnp.where(is_stop, sampling.FINISH_STOP_TOKEN,
                     jnp.where(n < full, sampling.FINISH_LENGTH, sampling.FINISH_PREDICATE))
  return state._replace(
      logprobs=jnp.where(written, logprob, state.logprobs),
      num_new=jnp.where(live, n, state.num_new),
      done=jnp.ones((b,), bool),
      finish=jnp.where(live, finish, state.finish),
  ), live


def scripted_decode(script, lengths, config, params, state, *, max_new, sampling, stop_ids,
                    stop_predicate, check_every):
  """Emits script[b, t, :lengths[b, t]] as attempt t of row b (t counted in stop_state)."""
  del sampling, stop_predicate, check_every
  rows = jnp.arange(state.pos.shape[0])
  turn = jnp.minimum(state.stop_state, script.shape[1] - 1)
  state, live = _emit(config, params, state, script[rows, turn], lengths[rows, turn], max_new,
                      stop_ids)
  return state._replace(stop_state=state.stop_state + live.astype(jnp.int32))


def hint_aware_decode(hint_id, wrong, right, config, params, state, *, max_new, sampling,
                      stop_ids, stop_predicate, check_every):
  """Emits `right` when the dialogue contains token `hint_id`, else `wrong` (id lists)."""
  del sampling, stop_predicate, check_every
  width = max(len(wrong), len(right))
  pad = lambda ids: jnp.asarray(list(ids) + [ids[-1]] * (width - len(ids)), jnp.int32)
  hinted = ((state.tokens == hint_id) & state.cache.valid).any(axis=1)
  toks = jnp.where(hinted[:, None], pad(right)[None], pad(wrong)[None])
  full = jnp.where(hinted, len(right), len(wrong)).astype(jnp.int32)
  state, _ = _emit(config, params, state, toks, full, max_new, stop_ids)
  return state


def stop_rule_decode(script, config, params, state, *, max_new, sampling, stop_ids,
                     stop_predicate, check_every):
  """Emits the id list `script` for every live row, cut where the real decode stops.

  The cut follows the sampler's rules: after the first stop id (kept, as decode writes it)
  or, with a stop predicate, after the token where it first fires (check_every = 1).
  """
  del sampling, check_every
  b = state.pos.shape[0]
  ids = jnp.asarray(script, jnp.int32)
  full = jnp.full((b,), ids.shape[0], jnp.int32)
  cut = jnp.isin(ids, jnp.asarray(stop_ids))[:, None] & jnp.ones((1, b), bool)  # [L, B]
  if stop_predicate is not None:
    live = jnp.ones((b,), bool)
    step = lambda st, tok: stop_predicate.update(st, jnp.full((b,), tok), live)
    _, fired = jax.lax.scan(step, stop_predicate.init(b), ids)
    cut = cut | fired
  full = jnp.where(cut.any(0), jnp.argmax(cut, axis=0) + 1, full)
  state, _ = _emit(config, params, state, jnp.broadcast_to(ids, (b, ids.shape[0])), full,
                   max_new, stop_ids)
  return state


def script_chooser(script, lengths):
  """choose_fn emitting script[q, t, :lengths[q, t]] as attempt t of episode q (log-prob -0.25)."""
  sc, ln = jnp.asarray(script), jnp.asarray(lengths)

  def choose(logits, keys, ctl):
    del logits, keys
    q = jnp.minimum(ctl.seq, sc.shape[0] - 1)
    t = jnp.minimum(ctl.attempt, sc.shape[1] - 1)
    tok = sc[q, t, jnp.minimum(ctl.num_new, sc.shape[2] - 1)]
    return tok, jnp.full(tok.shape, -0.25), ctl.num_new + 1 >= ln[q, t]

  return choose
