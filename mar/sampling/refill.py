"""Pieces of the continuous engine that act on the sampler's cache: row refills and per-token keys.

`fill_rows` starts new sequences in some rows of a live cache: it prefills their prompts on a
fresh [R, P] cache (R rows, not all B, so a refill costs R x P tokens of forward) and writes
the result into those rows' slots 0..P-1, marking the rest of each row invalid. The slot
layout is the sampler's (slot s of a row holds its s-th token, left padding first), so a
sequence started by a refill sits in its row exactly as one started by `prefill`.

`token_keys` / `sample_rows` make sampling independent of the schedule: the key of a token is
derived from (sequence id, token index) alone, never from the row or the decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mar.models import model as qwen
from mar.sampling.sample import SamplingParams, sample
from mar.sampling.sampler import prefill


def _set_rows(big: jax.Array, rows: jax.Array, small: jax.Array, row_axis: int,
              slot_axis: int) -> jax.Array:
  """big[..., rows, ..., :P, ...] = small (rows == B are dropped)."""
  p = small.shape[slot_axis]
  idx = [slice(None)] * big.ndim
  idx[row_axis] = rows
  idx[slot_axis] = slice(0, p)
  # A basic slice after an advanced index keeps the advanced axis in place here (one
  # advanced index), so `small` is laid out as the selected region.
  return big.at[tuple(idx)].set(small.astype(big.dtype), mode="drop")


def write_rows(cache: qwen.KVCache, rows: jax.Array, small: qwen.KVCache) -> qwen.KVCache:
  """Copies a fresh [R, P]-slot cache into `rows` [R] of a [B, S] cache; slots >= P invalid."""
  s, p = cache.valid.shape[1], small.valid.shape[1]
  valid = jnp.pad(small.valid, ((0, 0), (0, s - p)))
  valid = cache.valid.at[rows].set(valid, mode="drop")
  if qwen.is_unstacked(cache.k):
    small = qwen.unstack_cache(small)  # keys [R, K, Dh, P], values [R, K, P, Dh]
    k = tuple(_set_rows(c, rows, n, 0, 3) for c, n in zip(cache.k, small.k))
    v = tuple(_set_rows(c, rows, n, 0, 2) for c, n in zip(cache.v, small.v))
  else:
    small = qwen.stack_cache(small)  # [L, R, K, P, Dh]
    k, v = _set_rows(cache.k, rows, small.k, 1, 3), _set_rows(cache.v, rows, small.v, 1, 3)
  return qwen.KVCache(k=k, v=v, valid=valid)


def fill_rows(config, params, cache: qwen.KVCache, rows: jax.Array, prompt_tokens: jax.Array,
              prompt_mask: jax.Array):
  """Prefills prompts [R, P] (left-padded) into `rows` [R] of `cache` (rows == B: skipped).

  Returns (cache, logits [R, V] after each prompt, rope_pos [R] = real prompt tokens).
  """
  r, p = prompt_tokens.shape
  st = prefill(config, params, prompt_tokens, prompt_mask, p)
  return write_rows(cache, rows, st.cache), st.logits, st.rope_pos


def token_keys(key: jax.Array, seq: jax.Array, index: jax.Array) -> jax.Array:
  """One PRNG key per row, from (sequence id, token index in the sequence) [B] alone."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(key, s), i))(seq, index)


def sample_rows(logits: jax.Array, keys: jax.Array, params: SamplingParams):
  """`sample` with one key per row: (tokens [B], logprobs [B])."""
  if params.greedy:
    return sample(logits, None, params)  # greedy draws nothing
  tok, lp = jax.vmap(lambda l, k: sample(l[None], k, params))(logits, keys)
  return tok[:, 0], lp[:, 0]
