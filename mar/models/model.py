"""Qwen2 / Qwen2.5 / Qwen3 decoder as plain JAX functions over a params pytree.

Parameter layout (L = layers, D = hidden, K = KV heads, R = query heads per KV head,
Dh = head_dim, F = intermediate, V = vocab). Layers are stacked on a leading axis and run
with `lax.scan`, so compile time does not grow with depth. Projections are fused so one
matmul serves q, k and v (and gate and up): decode on small batches is bound by weight
reads and per-op overhead, and fewer, larger matmuls help both.

  embed                [V, D]
  layers/attn_norm     [L, D]
  layers/qkv           [L, D, K, R + 2, Dh]   slots 0..R-1 = queries of the group, R = key, R+1 = value
  layers/qkv_bias      [L, K, R + 2, Dh]      (Qwen2 only)
  layers/q_norm        [L, Dh]                (Qwen3 only)
  layers/k_norm        [L, Dh]                (Qwen3 only)
  layers/o             [L, K, R, Dh, D]
  layers/mlp_norm      [L, D]
  layers/gate_up       [L, D, 2, F]
  layers/down          [L, F, D]
  final_norm           [D]
  lm_head              [D, V]                 (untied models only)

Attention masks are per key slot (`valid`), never a contiguous length, so left padding
and turns appended later can sit anywhere; RoPE positions are passed in explicitly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mar.models.config import QwenConfig

_MASK_VALUE = -1e30  # finite, so a row with no valid key gives uniform weights, not NaN


class KVCache(NamedTuple):
  """Fixed-size cache. k, v: [L, B, K, S, Dh]; valid: [B, S] marks real slots."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = dtype or config.dtype
  shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch, max_len), bool),
  )


# ----- building blocks ----------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' convention. x: [B, T, ..., Dh]; positions: [B, T]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _project_qkv(config: QwenConfig, lp: dict, x: jax.Array, positions: jax.Array):
  """x: [B, T, D] -> q [B, T, K, R, Dh], k and v [B, T, K, Dh] (RoPE applied)."""
  r = config.group_size
  qkv = jnp.einsum("btd,dkjh->btkjh", x, lp["qkv"].astype(x.dtype))
  if config.qkv_bias:
    qkv = qkv + lp["qkv_bias"].astype(x.dtype)
  q, k, v = qkv[..., :r, :], qkv[..., r, :], qkv[..., r + 1, :]
  if config.qk_norm:
    q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  q = rope(q, positions, config.rope_theta)
  k = rope(k, positions, config.rope_theta)
  return q, k, v


def _attend(config: QwenConfig, q, k, v, mask) -> jax.Array:
  """q: [B, T, K, R, Dh]; k, v: [B, K, S, Dh]; mask: [B, T, S] -> [B, T, K, R, Dh]."""
  scale = config.head_dim**-0.5
  scores = jnp.einsum("btkrh,bksh->bkrts", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * scale, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkrts,bksh->btkrh", probs, v)


def _mlp(lp: dict, x: jax.Array) -> jax.Array:
  gu = jnp.einsum("btd,dcf->btcf", x, lp["gate_up"].astype(x.dtype))
  h = jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
  return jnp.einsum("btf,fd->btd", h, lp["down"].astype(x.dtype))


def _layer(config: QwenConfig, lp: dict, x, positions, mask, cache_kv, start):
  """One decoder layer. Without a cache (cache_kv None) attends within x.

  With a cache, writes this call's k/v at slots start[b] .. start[b]+T-1 and attends to
  the whole cache (`mask` already covers validity and causality by slot).
  """
  h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
  q, k, v = _project_qkv(config, lp, h, positions)
  k = k.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
  v = v.transpose(0, 2, 1, 3)
  if cache_kv is not None:
    ck, cv = cache_kv
    write = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))
    ck = write(ck, k.astype(ck.dtype), start)
    cv = write(cv, v.astype(cv.dtype), start)
    k, v, cache_kv = ck.astype(x.dtype), cv.astype(x.dtype), (ck, cv)
  attn = _attend(config, q, k, v, mask)
  x = x + jnp.einsum("btkrh,krhd->btd", attn, lp["o"].astype(x.dtype))
  x = x + _mlp(lp, rms_norm(x, lp["mlp_norm"], config.rms_norm_eps))
  return x, cache_kv


def _run_layers(config: QwenConfig, params, x, positions, mask, cache=None, start=None):
  def body(x, xs):
    if cache is None:
      lp, kv = xs, None
    else:
      lp, kv = xs
    x, kv = _layer(config, lp, x, positions, mask, kv, start)
    return x, kv

  if config.remat:
    body = jax.checkpoint(body, prevent_cse=False)
  xs = params["layers"] if cache is None else (params["layers"], (cache.k, cache.v))
  x, kv = jax.lax.scan(body, x, xs)
  return x, kv


def _embed(config: QwenConfig, params, tokens):
  return params["embed"][tokens].astype(config.dtype)


def logits_from_hidden(config: QwenConfig, params, h: jax.Array) -> jax.Array:
  """Final-normed hidden [..., D] -> f32 logits [..., V]."""
  w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions that count only real tokens (0 for left padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ----- public entry points --------------------------------------------------------------


def hidden_states(config: QwenConfig, params, tokens, positions=None, attention_mask=None):
  """Uncached pass: tokens [B, T] -> final-normed hidden states [B, T, D]."""
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = default_positions(attention_mask)
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = causal[None] & attention_mask[:, None, :]
  x, _ = _run_layers(config, params, _embed(config, params, tokens), positions, mask)
  return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def forward(config: QwenConfig, params, tokens, positions=None, attention_mask=None):
  """Uncached pass: tokens [B, T] -> f32 logits [B, T, V]."""
  h = hidden_states(config, params, tokens, positions, attention_mask)
  return logits_from_hidden(config, params, h)


def forward_cached(
    config: QwenConfig,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    token_valid: jax.Array,
    cache: KVCache,
    start: jax.Array,
):
  """Cached pass used by prefill, decode and turn appends.

  tokens, positions, token_valid: [B, T]; start: [B] int32, the cache slot of tokens[:, 0].
  Writes the T new tokens at slots start[b] + (0..T-1); their validity is token_valid.
  Each query attends to valid slots at or before its own slot.
  Returns (final-normed hidden [B, T, D], updated cache). The caller must keep
  start + T <= S (dynamic_update_slice would clamp and shift the write).
  """
  b, t = tokens.shape
  s = cache.valid.shape[1]
  slots = start[:, None] + jnp.arange(t)[None]  # [B, T]
  write_valid = jax.vmap(lambda c, n, st: jax.lax.dynamic_update_slice(c, n, (st,)))
  valid = write_valid(cache.valid, token_valid.astype(bool), start)
  mask = (jnp.arange(s)[None, None, :] <= slots[:, :, None]) & valid[:, None, :]
  x = _embed(config, params, tokens)
  x, (k, v) = _run_layers(config, params, x, positions, mask, cache, start)
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  return h, KVCache(k=k, v=v, valid=valid)


# ----- value model (PPO critic) -----------------------------------------------------------


def init_value_head(config: QwenConfig, key: jax.Array) -> jax.Array:
  """Linear(hidden, 1, bias=False) head, init N(0, 1/(hidden+1)) as in the reference."""
  std = (1.0 / (config.hidden_size + 1)) ** 0.5
  return std * jax.random.normal(key, (config.hidden_size,), jnp.float32)


def value_forward(config: QwenConfig, params, tokens, positions=None, attention_mask=None):
  """Critic: backbone + value head. params = {'backbone': ..., 'value_head': [D]} -> [B, T]."""
  h = hidden_states(config, params["backbone"], tokens, positions, attention_mask)
  return jnp.einsum("btd,d->bt", h.astype(jnp.float32), params["value_head"].astype(jnp.float32))
