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


def _set_rows(big: jax.Array, rows: jax.Array, small: jax.Array, row_axis: int,
              slot_axis: int) -> jax.Array:
  """big[..., rows, ..., :P, ...] = small (rows == B are dropped); a big with fewer slots than
  small (a cache window) takes small's first ones."""
  p = min(small.shape[slot_axis], big.shape[slot_axis])
  small = jax.lax.slice_in_dim(small, 0, p, axis=slot_axis)
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
  per_layer = qwen.is_unstacked(cache.k)
  small = qwen.unstack_cache(small) if per_layer else qwen.stack_cache(small)
  # (row axis, slot axis) of keys [R, K, Dh, P] and values [R, K, P, Dh] per layer, or of
  # both [L, R, K, P, Dh].
  k_axes, v_axes = ((0, 3), (0, 2)) if per_layer else ((1, 3), (1, 3))
  put = lambda big, new, axes: jax.tree.map(lambda b, n: _set_rows(b, rows, n, *axes), big, new)
  k, v = put(cache.k, small.k, k_axes), put(cache.v, small.v, v_axes)
  if cache.k_win is None:
    return qwen.KVCache(k=k, v=v, valid=valid)
  return qwen.KVCache(k, v, valid, put(cache.k_win, small.k, k_axes),
                      put(cache.v_win, small.v, v_axes))


def _pad_slots_left(cache: qwen.KVCache, p: int) -> qwen.KVCache:
  """A one-prompt cache of W slots as P slots, the W at the end (the rest empty, invalid)."""
  w = cache.valid.shape[1]
  pad = lambda a, axis: jnp.pad(a, [(p - w, 0) if d == axis else (0, 0) for d in range(a.ndim)])
  if qwen.is_unstacked(cache.k):  # keys [1, K, Dh, W], values [1, K, W, Dh]
    k, v = tuple(pad(x, 3) for x in cache.k), tuple(pad(x, 2) for x in cache.v)
  else:  # [L, 1, K, W, Dh]
    k, v = pad(cache.k, 3), pad(cache.v, 3)
  return qwen.KVCache(k=k, v=v, valid=pad(cache.valid, 1))


def fill_rows(config, params, cache: qwen.KVCache, rows: jax.Array, prompt_tokens: jax.Array,
              prompt_mask: jax.Array, widths: Sequence[int] = ()):
  """Prefills prompts [R, P] (left-padded) into `rows` [R] of `cache` (rows == B: skipped).

  Each row is prefilled alone, at the smallest of `widths` (ascending; default and last: P)
  that holds its prompt, into slots P-W..P-1 of its row: the tokens computed follow the row's
  own prompt, not the longest one that refills with it, and a row's cache and logits do not
  depend on which rows refill with it. Skipped rows compute nothing (a branch of zeros).
  A prompt equal to the one before it (a GRPO group's members queue one after another) is
  not prefilled again: its row gets that row's prefilled cache and logits, the very
  numbers a prefill would give.
  The live cache is never an operand of a branch (XLA would copy it into each branch's
  output): the branches return one prompt's [1, P] cache, written in after the switch.
  Returns (cache, logits [R, V] after each prompt, rope_pos [R] = real prompt tokens).
  """
  r, p = prompt_tokens.shape
  b = cache.valid.shape[0]
  widths = tuple(w for w in widths if w < p) + (p,)
  real = rows < b
  same = (jnp.all(prompt_tokens[1:] == prompt_tokens[:-1], axis=1)
          & jnp.all(prompt_mask[1:] == prompt_mask[:-1], axis=1) & real[1:] & real[:-1])
  repeat = jnp.concatenate([jnp.zeros((1,), bool), same])  # [R]: copy row i - 1's prompt

  def prefill_at(w, toks, mask):
    st = prefill(config, params, toks[None, p - w:], mask[None, p - w:], w)
    return _pad_slots_left(st.cache, p), st.logits[0]

  shapes = jax.eval_shape(functools.partial(prefill_at, p), prompt_tokens[0], prompt_mask[0])
  skip = lambda toks, mask: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  branches = [functools.partial(prefill_at, w) for w in widths] + [skip]

  def one(i, carry):
    cache_, logits, rope, last = carry
    toks, mask, row, rep = prompt_tokens[i], prompt_mask[i], rows[i], repeat[i]
    n = mask.sum().astype(jnp.int32)
    k = jnp.where(real[i] & ~rep, jnp.searchsorted(jnp.asarray(widths), n), len(widths))
    small = jax.lax.switch(k, branches, toks, mask)
    # A repeated prompt writes the previous row's prefill again (kept in the carry: reading
    # it back from the live cache would make XLA copy the cache).
    small = jax.tree.map(lambda x, y: jnp.where(rep, y, x), small, last)
    cache_ = write_rows(cache_, row[None], small[0])  # rows == B: dropped
    return cache_, logits.at[i].set(small[1]), rope.at[i].set(n), small

  logits = jnp.zeros((r, config.vocab_size), jnp.float32)
  last = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  out = jax.lax.fori_loop(0, r, one, (cache, logits, jnp.zeros((r,), jnp.int32), last))
  return out[:3]


def token_keys(key: jax.Array, seq: jax.Array, index: jax.Array) -> jax.Array:
  """One PRNG key per row, from (sequence id, token index in the sequence) [B] alone."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(key, s), i))(seq, index)


def sample_rows(logits: jax.Array, keys: jax.Array, params: SamplingParams):
  """`sample` with one key per row: (tokens [B], logprobs [B])."""
  if params.greedy:
    return sample(logits, None, params)  # greedy draws nothing
  tok, lp = jax.vmap(lambda l, k: sample(l[None], k, params))(logits, keys)
  return tok[:, 0], lp[:, 0]
