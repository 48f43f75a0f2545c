"""Per-token log-probs, entropies and values of whole dialogues (training-side forwards).

Dialogues are the rollout's slot buffers: tokens [B, S] with a validity mask; valid slots
are contiguous after the left padding, so the token at slot s is predicted from the hidden
state at slot s - 1. Log-probs are computed in sequence chunks so that the [B, S, V]
logits of a real vocabulary (151k) never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mar.models import model as qwen
from mar.models.config import QwenConfig


def _shift_right(x: jax.Array, fill) -> jax.Array:
  """x[:, s] <- x[:, s - 1]; slot 0 gets `fill`."""
  pad = jnp.full_like(x[:, :1], fill)
  return jnp.concatenate([pad, x[:, :-1]], axis=1)


def _chunked(fn, h, targets, chunk: int):
  """Applies fn(h_chunk [B, C, D], targets_chunk [B, C]) -> tuple of [B, C] over S."""
  b, s, d = h.shape
  c = min(chunk, s)
  pad = (-s) % c
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = h.shape[1] // c
  hs = h.reshape(b, n, c, d).swapaxes(0, 1)
  ts = targets.reshape(b, n, c).swapaxes(0, 1)
  outs = jax.lax.map(lambda xs: fn(*xs), (hs, ts))
  return tuple(o.swapaxes(0, 1).reshape(b, n * c)[:, :s] for o in outs)


def token_logprobs(
    config: QwenConfig,
    params,
    tokens: jax.Array,
    valid: jax.Array,
    temperature: float = 1.0,
    chunk: int = 512,
    with_entropy: bool = False,
    segment_ids: jax.Array | None = None,
    score_slots: tuple[jax.Array, jax.Array] | None = None,
    positions: jax.Array | None = None,
    prefix_ids: jax.Array | None = None,
):
  """log pi(tokens[s] | tokens[<s]) at every slot s (0 where s has no predecessor).

  Returns logp [B, S] (and entropy [B, S] of the predicting distribution if asked).
  `temperature` must match the sampler's so these equal the sampling log-probs.
  With `segment_ids` (packed rows, `rl.packing`), `valid` must be segment_ids > 0 and each
  segment is scored as its own sequence (`positions` / `prefix_ids`: see
  `models.model.hidden_states`; responses packed after their shared prompt).

  `score_slots` = (sources, targets), int32 [B, K] slot indices per row: only the tokens at
  `targets` are scored, each from the hidden state at `sources` (its predecessor); the LM
  head and the softmax run at those K slots instead of all S, and every other slot
  gets 0. Pairs with a target >= S are padding.
  """
  h = qwen.hidden_states(config, params, tokens, positions, attention_mask=valid,
                         segment_ids=segment_ids, prefix_ids=prefix_ids)
  t = temperature if temperature > 0 else 1.0

  def score(hc, tc):
    logits = qwen.logits_from_hidden(config, params, hc) / t
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    logp = picked - logz
    if not with_entropy:
      return (logp,)
    probs = jnp.exp(logits - logz[..., None])
    ent = logz - jnp.sum(probs * logits, axis=-1)
    return logp, ent

  if score_slots is not None:
    src, tgt = score_slots
    s = tokens.shape[1]
    h_src = jnp.take_along_axis(h, jnp.clip(src, 0, s - 1)[..., None], axis=1)  # [B, K, D]
    t_tgt = jnp.take_along_axis(tokens, jnp.clip(tgt, 0, s - 1), axis=1)
    rows = jnp.arange(tokens.shape[0])[:, None]
    outs = tuple(jnp.zeros(tokens.shape, o.dtype).at[rows, tgt].set(o, mode="drop")
                 for o in _chunked(score, h_src, t_tgt, chunk))
    return outs if with_entropy else outs[0]
  h_prev = _shift_right(h, 0.0)
  outs = _chunked(score, h_prev, tokens, chunk)
  has_prev = _has_prev(valid, segment_ids)
  outs = tuple(jnp.where(has_prev, o, 0.0) for o in outs)
  return outs if with_entropy else outs[0]


def score_slots_host(mask: np.ndarray, prev: np.ndarray | None = None,
                     minimum: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Host: the `token_logprobs` score_slots of the True slots of `mask` [B, S].

  Sources are `prev` [B, S] (each slot's predecessor, -1: none, then the slot is not
  scored; default: the slot before). K, the pairs per row, is the largest row's count
  rounded up to a power of two, at least `minimum` (default: S / 2 rounded up to one) and
  at most S, so programs compile for one or two widths; padding pairs target slot S.
  """
  mask = np.asarray(mask, bool)
  b, s = mask.shape
  if prev is None:
    prev = np.broadcast_to(np.arange(s, dtype=np.int32) - 1, (b, s))
  mask = mask & (np.asarray(prev) >= 0)
  pow2 = lambda n: 1 << (max(n, 1) - 1).bit_length()
  k = min(max(pow2(int(mask.sum(1).max(initial=0))),
              pow2(s // 2) if minimum is None else minimum), s)
  tgt = np.full((b, k), s, np.int32)
  src = np.zeros((b, k), np.int32)
  for r in range(b):
    slots = np.flatnonzero(mask[r])
    tgt[r, :len(slots)] = slots
    src[r, :len(slots)] = prev[r, slots]
  return src, tgt


def _has_prev(valid: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Slots whose predecessor slot holds the same sequence's previous token."""
  has_prev = _shift_right(valid, False) & valid
  if segment_ids is not None:
    has_prev &= _shift_right(segment_ids, 0) == segment_ids
  return has_prev


def token_values(config: QwenConfig, critic_params, tokens: jax.Array, valid: jax.Array,
                 segment_ids: jax.Array | None = None):
  """values[b, s] = critic value of the state before the token at slot s ([B, S])."""
  v = qwen.value_forward(config, critic_params, tokens, attention_mask=valid,
                         segment_ids=segment_ids)
  return jnp.where(_has_prev(valid, segment_ids), _shift_right(v, 0.0), 0.0)
