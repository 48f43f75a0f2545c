"""Pieces of the continuous engine that act on the sampler's cache: row refills and per-token keys.

`fill_rows` starts new sequences in some rows of a live cache: it prefills each prompt alone,
at the smallest prompt width that holds it (a refill costs the rows' own prompt tokens, rounded
up to a width, not R x P), and writes it into its row's slots P-W..P-1, marking the rest of
the row invalid. The slot layout is the sampler's (slot s of a row holds its s-th token, left
padding first), so a sequence started by a refill sits in its row exactly as one started by
`prefill`.

`token_keys` / `sample_rows` make sampling independent of the schedule: the key of a token is
derived from (sequence id, token index) alone, never from the row or the decode step.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from mar.models import model as qwen
from mar.sampling.sample import SamplingParams, sample
from mar.sampling.sampler import prefill


def _put_row(big: jax.Array, small: jax.Array, row: jax.Array, slot: int, row_axis: int,
             slot_axis: int):
  """Writes `small` (one row, W slots) into `big` at (row, slots slot..slot+W-1)."""
  start = [jnp.zeros((), jnp.int32)] * big.ndim
  start[row_axis] = row
  start[slot_axis] = jnp.asarray(slot, jnp.int32)
  return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)


def _write_row(cache: qwen.KVCache, row: jax.Array, small: qwen.KVCache, end: int):
  """Copies a fresh one-row cache of W slots into `row` of `cache` at slots end-W..end-1.

  Every other slot of the row is marked invalid (what an earlier episode left there is dead).
  """
  s, w = cache.valid.shape[1], small.valid.shape[1]
  valid = jnp.zeros((1, s), bool)
  valid = jax.lax.dynamic_update_slice(valid, small.valid, (0, end - w))
  valid = jax.lax.dynamic_update_slice(cache.valid, valid, (row, 0))
  if qwen.is_unstacked(cache.k):
    small = qwen.unstack_cache(small)  # keys [1, K, Dh, W], values [1, K, W, Dh]
    k = tuple(_put_row(c, n, row, end - w, 0, 3) for c, n in zip(cache.k, small.k))
    v = tuple(_put_row(c, n, row, end - w, 0, 2) for c, n in zip(cache.v, small.v))
  else:  # stacked [L, B, K, S, Dh]
    small = qwen.stack_cache(small)
    k, v = (_put_row(c, n, row, end - w, 1, 3)
            for c, n in ((cache.k, small.k), (cache.v, small.v)))
  return qwen.KVCache(k=k, v=v, valid=valid)


def fill_rows(config, params, cache: qwen.KVCache, rows: jax.Array, prompt_tokens: jax.Array,
              prompt_mask: jax.Array, widths: Sequence[int] = ()):
  """Prefills prompts [R, P] (left-padded) into `rows` [R] of `cache` (rows == B: skipped).

  Each row is prefilled alone, at the smallest of `widths` (ascending; default and last: P)
  that holds its prompt, into slots P-W..P-1 of its row: the tokens computed follow the row's
  own prompt, not the longest one that refills with it, and a row's cache and logits do not
  depend on which rows refill with it. Skipped rows cost nothing (`lax.cond`).
  Returns (cache, logits [R, V] after each prompt, rope_pos [R] = real prompt tokens).
  """
  r, p = prompt_tokens.shape
  b = cache.valid.shape[0]
  widths = tuple(w for w in widths if w < p) + (p,)

  def prefill_at(w, args):
    cache_, toks, mask, row = args
    st = prefill(config, params, toks[None, p - w:], mask[None, p - w:], w)
    return _write_row(cache_, row, st.cache, p), st.logits[0]

  def one(i, carry):
    cache_, logits, rope = carry
    toks, mask, row = prompt_tokens[i], prompt_mask[i], rows[i]
    n = mask.sum().astype(jnp.int32)
    k = jnp.searchsorted(jnp.asarray(widths), n).astype(jnp.int32)
    run = lambda a: jax.lax.switch(
        k, [functools.partial(prefill_at, w) for w in widths], a)
    skip = lambda a: (a[0], jnp.zeros((logits.shape[1],), logits.dtype))
    cache_, row_logits = jax.lax.cond(row < b, run, skip, (cache_, toks, mask, row))
    return cache_, logits.at[i].set(row_logits), rope.at[i].set(n)

  logits = jnp.zeros((r, config.vocab_size), jnp.float32)
  return jax.lax.fori_loop(0, r, one, (cache, logits, jnp.zeros((r,), jnp.int32)))


def token_keys(key: jax.Array, seq: jax.Array, index: jax.Array) -> jax.Array:
  """One PRNG key per row, from (sequence id, token index in the sequence) [B] alone."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(key, s), i))(seq, index)


def sample_rows(logits: jax.Array, keys: jax.Array, params: SamplingParams):
  """`sample` with one key per row: (tokens [B], logprobs [B])."""
  if params.greedy:
    return sample(logits, None, params)  # greedy draws nothing
  tok, lp = jax.vmap(lambda l, k: sample(l[None], k, params))(logits, keys)
  return tok[:, 0], lp[:, 0]
