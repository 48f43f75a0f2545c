"""Picking the next token from logits: greedy, temperature, top-k, top-p.

Everything here avoids the operations XLA:CPU runs slowly on a [B, V] row: `argmax` (a
variadic reduce), `cumsum` and `sort` over the vocabulary. Argmax and categorical draws go
through two levels of chunks of about sqrt(V) entries (reductions are fast, small
argmaxes are cheap), the plain-temperature path never sorts, and top-p finds its
probability threshold by bisection on the float bits instead of sorting.

Log-prob convention (what PPO re-computes with a forward pass at the same temperature):
  * temperature > 0: log-prob of the sampled token under softmax(logits / temperature),
    BEFORE top-k / top-p filtering;
  * temperature == 0 (greedy): log-prob of the argmax token under softmax(logits).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static sampling settings (hashable: a jit static argument). temperature 0 = greedy."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingParams.temperature: expected >= 0, found {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams.top_p: expected in (0, 1], found {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k: expected >= 0, found {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


# ----- argmax and categorical draws without a full-vocabulary argmax ------------------------


def _first_argmax_small(x: jax.Array) -> jax.Array:
  """Index of the first maximum along the last axis, via max + min-index (fast reductions)."""
  n = x.shape[-1]
  m = jnp.max(x, axis=-1, keepdims=True)
  iota = jnp.arange(n, dtype=jnp.float32)
  idx = jnp.min(jnp.where(x == m, iota, jnp.float32(n)), axis=-1)
  return jnp.minimum(idx.astype(jnp.int32), n - 1)  # n only for an all-NaN row


def _chunked(x: jax.Array, fill: float):
  """[B, V] -> [B, n, C] with C ~ sqrt(V) a power of two; pads the tail with `fill`."""
  b, v = x.shape
  c = 1 << max(3, round(math.log2(max(v, 1)) / 2))
  n = -(-v // c)
  if n * c != v:
    x = jnp.pad(x, ((0, 0), (0, n * c - v)), constant_values=fill)
  return x.reshape(b, n, c), c


_SINGLE_LEVEL_MAX_V = 16384  # below this one pass over the row beats two levels


def argmax(x: jax.Array) -> jax.Array:
  """First-occurrence argmax over the last axis of [B, V] (same ties as numpy / torch)."""
  if x.shape[-1] <= _SINGLE_LEVEL_MAX_V:
    return _first_argmax_small(x)
  xc, c = _chunked(x, _NEG_INF)
  chunk = _first_argmax_small(jnp.max(xc, axis=-1))  # [B]
  within = jnp.take_along_axis(xc, chunk[:, None, None], axis=1)[:, 0]  # [B, C]
  return chunk * c + _first_argmax_small(within)


def _categorical_with_lse(key: jax.Array, logits: jax.Array):
  """(one draw per row from softmax(logits) [B, V], logsumexp(logits) [B]).

  Two-level Gumbel-max: pick a chunk with probability equal to its mass, then a token
  within it. Exact in distribution, it draws only B * (V/C + C) random numbers, and the
  chunk masses give the log-normalizer for free. -inf entries are never drawn.
  """
  k_chunk, k_within = jax.random.split(key)
  xc, c = _chunked(logits, _NEG_INF)
  m = jnp.max(xc, axis=-1)  # [B, n]
  safe_m = jnp.where(jnp.isfinite(m), m, 0.0)
  chunk_logmass = jnp.log(jnp.sum(jnp.exp(xc - safe_m[..., None]), axis=-1)) + safe_m
  g1 = jax.random.gumbel(k_chunk, chunk_logmass.shape, jnp.float32)
  chunk = _first_argmax_small(chunk_logmass + g1)
  within = jnp.take_along_axis(xc, chunk[:, None, None], axis=1)[:, 0]
  g2 = jax.random.gumbel(k_within, within.shape, jnp.float32)
  tok = chunk * c + _first_argmax_small(within + g2)
  return tok, jax.nn.logsumexp(chunk_logmass, axis=-1)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits) [B, V]; -inf entries are never drawn."""
  return _categorical_with_lse(key, logits)[0]


# ----- filters ------------------------------------------------------------------------


def _top_p_threshold(probs: jax.Array, top_p: float) -> jax.Array:
  """Per row, the largest t with sum(probs[probs >= t]) >= top_p * sum(probs).

  Bisection over the bit patterns of non-negative floats (ordered like the floats), so it
  is exact after 32 steps; {probs >= t} is the nucleus (ties at the boundary kept).
  """
  target = top_p * jnp.sum(probs, axis=-1)
  lo = jnp.zeros(probs.shape[:1], jnp.int32)  # mass(>= 0) = total: always satisfies
  hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32) + 1  # never satisfies

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    t = jax.lax.bitcast_convert_type(mid, jnp.float32)
    ok = jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1) >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _top_p_sorted(vals: jax.Array, top_p: float) -> jax.Array:
  """Keep-mask over logits sorted descending [B, k]: the shortest prefix with mass >= top_p."""
  probs = jax.nn.softmax(vals, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  return before < top_p


def filtered_logits(scaled: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with the entries top-k / top-p exclude set to -inf.

  (Reference semantics; `sample` draws from the same distribution more cheaply.)
  """
  v = scaled.shape[-1]
  keep = jnp.ones(scaled.shape, bool)
  if 0 < params.top_k < v:
    kth = jax.lax.top_k(scaled, params.top_k)[0][:, -1:]
    keep &= scaled >= kth
  if params.top_p < 1:
    masked = jnp.where(keep, scaled, _NEG_INF)
    probs = jax.nn.softmax(masked, axis=-1)
    keep &= probs >= _top_p_threshold(probs, params.top_p)[:, None]
  return jnp.where(keep, scaled, _NEG_INF)


# ----- the sampler's step -------------------------------------------------------------


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams):
  """logits [B, V] f32 -> (tokens [B] int32, logprobs [B] f32); see the module docstring."""
  logits = logits.astype(jnp.float32)
  if params.greedy:
    tok = argmax(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)  # = logits[tok]
    return tok, -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  scaled = logits / params.temperature
  v = scaled.shape[-1]
  lse = None
  if 0 < params.top_k < v:
    vals, idx = jax.lax.top_k(scaled, params.top_k)  # sorted descending
    if params.top_p < 1:
      vals = jnp.where(_top_p_sorted(vals, params.top_p), vals, _NEG_INF)
    choice = categorical(key, vals)
    tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  elif params.top_p < 1:
    tok = categorical(key, filtered_logits(scaled, params))
  else:  # plain temperature: no sort, no filter
    tok, lse = _categorical_with_lse(key, scaled)
  if lse is None:
    lse = jax.nn.logsumexp(scaled, axis=-1)
  tok = tok.astype(jnp.int32)
  return tok, jnp.take_along_axis(scaled, tok[:, None], axis=-1)[:, 0] - lse


def sample_rows(logits: jax.Array, keys: jax.Array, params: SamplingParams):
  """`sample` with one PRNG key per row (keys [B]): a row's draw depends on its key only,
  not on which other rows share its batch or device."""
  if params.greedy:
    return sample(logits, keys[0], params)
  tok, lp = jax.vmap(lambda row, k: sample(row[None], k, params))(logits, keys)
  return tok[:, 0], lp[:, 0]
