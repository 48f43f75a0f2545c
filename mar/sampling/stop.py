"""On-device stop predicates over the generated tokens.

A `StopPredicate` is a pytree: its leaves are device tables built once on the host from
the tokenizer's per-token strings, and its static part is a pair of pure functions, so it
can be passed to (or closed over by) a jitted decode. The decode loop calls
`update(stop_state, token, live)` after every sampled token; `fired` is sticky.

`boxed_stop_predicate` fires as soon as the text generated in the current decode call
contains a closed `\\boxed{...}`: a `\\boxed{` opening (which may be split across tokens),
followed by braces that balance back to the opening's level. Per token it needs only:
  * the net brace count and the lowest relative depth reached inside the token (does a
    box opened earlier close inside this token?), and
  * for each state of a matcher of `\\boxed{` (how many of its chars the previous text
    ended with): the matcher state after the token, whether the token completes an
    opening (and at which relative depth the last one sits) and whether an opening made
    inside the token also closes inside it.
Open boxes close innermost first, so the state per row is just (matcher state, brace
depth, depth of the latest opening, fired). `host_has_closed_box` is the text reference.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BOX_OPEN = "\\boxed{"
_NO_OPEN = -(1 << 30)  # open level when no box is open: no depth is ever below it


def host_has_closed_box(text: str) -> bool:
  """Does `text` contain a `\\boxed{` whose braces (counted from the opening) close?"""
  start = text.find(BOX_OPEN)
  while start >= 0:
    depth = 0
    for ch in text[start + len(BOX_OPEN) - 1:]:
      if ch == "{":
        depth += 1
      elif ch == "}":
        depth -= 1
        if depth == 0:
          return True
    start = text.find(BOX_OPEN, start + 1)
  return False


@jax.tree_util.register_pytree_node_class
class StopPredicate:
  """Device tables plus static `init_fn(tables, batch)` / `update_fn(tables, state, tok, live)`."""

  def __init__(self, tables: Any, init_fn: Callable, update_fn: Callable, name: str = ""):
    self.tables = tables
    self.init_fn = init_fn
    self.update_fn = update_fn
    self.name = name

  def init(self, batch: int):
    """Fresh per-row state (the decode loop resets it at the start of every call)."""
    return self.init_fn(self.tables, batch)

  def update(self, stop_state, token: jax.Array, live: jax.Array):
    """(state, token [B], live [B]) -> (state, fired [B]); rows not live keep their state."""
    return self.update_fn(self.tables, stop_state, token, live)

  def tree_flatten(self):
    return (self.tables,), (self.init_fn, self.update_fn, self.name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def __repr__(self):
    return f"StopPredicate({self.name!r})"


# ----- the closed-\boxed{} predicate ------------------------------------------------------


def _matcher_step(q: int, ch: str) -> int:
  """KMP step for BOX_OPEN (all its chars are distinct, so a mismatch restarts at '\\')."""
  if ch == BOX_OPEN[q]:
    return q + 1
  return 1 if ch == BOX_OPEN[0] else 0


def _scan_piece(piece: str, q: int):
  """Runs one token string from matcher state q.

  Returns (next q, opened, relative depth of the last opening, closed inside).
  """
  depth, last_open, closed = 0, None, False
  for ch in piece:
    q = _matcher_step(q, ch)
    if ch == "{":
      depth += 1
      if q == len(BOX_OPEN):
        last_open, q = depth, 0
    elif ch == "}":
      depth -= 1
      if last_open is not None and depth < last_open:
        closed = True
  return q, last_open is not None, (last_open or 0), closed


# Packing of the per-(matcher state, token) table: low bits flags, high bits the depth.
_Q_BITS, _OPENED, _CLOSED, _REL_SHIFT, _REL_BIAS = 0x7, 1 << 3, 1 << 4, 8, 1 << 20
_HALF_BIAS = 1 << 14  # per-token brace counts are stored in 16-bit halves


def boxed_tables(token_strings: Sequence[str]) -> dict:
  """Host-built tables: 'per_token' [V] int32 and 'per_state' [7, V] int32 (packed)."""
  n_states = len(BOX_OPEN)
  v = len(token_strings)
  delta = np.zeros(v, np.int64)
  min_prefix = np.zeros(v, np.int64)
  per_state = np.zeros((n_states, v), np.int64)
  for t, piece in enumerate(token_strings):
    if "{" in piece or "}" in piece:
      steps = np.cumsum([1 if c == "{" else -1 for c in piece if c in "{}"])
      delta[t], min_prefix[t] = steps[-1], min(0, steps.min())
    base = None
    for q in range(n_states):
      # From q > 0 a piece not continuing the match behaves exactly as from q = 0.
      if q > 0 and not piece.startswith(BOX_OPEN[q]):
        per_state[q, t] = base
        continue
      nq, opened, rel, closed = _scan_piece(piece, q)
      packed = nq | (_OPENED if opened else 0) | (_CLOSED if closed else 0)
      packed |= (rel + _REL_BIAS) << _REL_SHIFT
      per_state[q, t] = packed
      if q == 0:
        base = packed
  if np.abs(delta).max(initial=0) >= _HALF_BIAS or np.abs(min_prefix).max(initial=0) >= _HALF_BIAS:
    raise ValueError(f"boxed_tables: a token string holds {_HALF_BIAS} or more braces")
  per_token = (delta + _HALF_BIAS) | ((min_prefix + _HALF_BIAS) << 16)
  return {
      "per_token": jnp.asarray(per_token.astype(np.int32)),
      "per_state": jnp.asarray(per_state.astype(np.int32)),
  }


def _boxed_init(tables, batch: int):
  del tables
  z = jnp.zeros((batch,), jnp.int32)
  return {"q": z, "depth": z, "open": jnp.full((batch,), _NO_OPEN, jnp.int32),
          "fired": jnp.zeros((batch,), bool)}


def _boxed_update(tables, state, token, live):
  v = tables["per_token"].shape[0]
  per_tok = tables["per_token"][token]
  delta = (per_tok & 0xFFFF) - _HALF_BIAS
  min_prefix = ((per_tok >> 16) & 0xFFFF) - _HALF_BIAS
  packed = tables["per_state"].reshape(-1)[state["q"] * v + token]
  opened = (packed & _OPENED) != 0
  closed_inside = (packed & _CLOSED) != 0
  rel = (packed >> _REL_SHIFT) - _REL_BIAS
  g = state["depth"]
  fired_now = closed_inside | (g + min_prefix < state["open"])
  new = {
      "q": packed & _Q_BITS,
      "depth": g + delta,
      "open": jnp.where(opened, g + rel, state["open"]),
      "fired": state["fired"] | fired_now,
  }
  new = jax.tree.map(lambda n, o: jnp.where(live, n, o), new, state)
  return new, new["fired"]


def boxed_stop_predicate(token_strings: Sequence[str]) -> StopPredicate:
  """Fires once the text generated in this decode call contains a closed `\\boxed{...}`.

  token_strings[i] is the decoded text of token id i (e.g. `tokenizer.decode([i])`).
  """
  return StopPredicate(boxed_tables(token_strings), _boxed_init, _boxed_update, "boxed")
