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

Two layouts of the same numbers: `params["layers"]` stacked as above (run with a scan), or
a tuple of per-layer dicts (`unstack_layers`, run as an unrolled loop), and likewise
`KVCache.k/v` stacked or per-layer (`unstack_cache`). XLA:CPU copies the per-layer dynamic
slices of a scan over stacked weights on every call, so the sampler's decode loop runs
unstacked there. Matmuls are 2-D with the weights in their stored order (the reshapes
are free), and cached passes scatter k/v in place instead of rebuilding the cache.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mar.models import fsdp
from mar.models.config import QwenConfig

_MASK_VALUE = -1e30  # finite, so a row with no valid key gives uniform weights, not NaN


class KVCache(NamedTuple):
  """Fixed-size cache. k, v: [L, B, K, S, Dh]; valid: [B, S] marks real slots.

  k and v may also be tuples of L per-layer arrays (`unstack_cache`): k[i] [B, K, Dh, S]
  (keys transposed) and v[i] [B, K, S, Dh]. That is the layout the sampler's decode loop
  uses: each layer's cache is its own buffer, updated in place and read without a slice
  copy, and both attention products are plain (non-transposed) matmuls, which XLA:CPU
  runs about 3x faster than q . k^T against a [S, Dh] key block.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  # The first `window_slots` slots of a long cache, in buffers of their own (same layout as
  # k / v), or None. Cached attention over the live blocks reads those slots here, in one
  # dense pass, and writes them only here (k / v keep what prefill put there): reading the
  # same slots out of the long buffer costs XLA:CPU a copy of each block, and writing one
  # slot of each long row touches a page per row (bench/README.md).
  k_win: Any = None
  v_win: Any = None


# The window a long cache keeps, in blocks of `attn_block` slots.
WINDOW_BLOCKS = 2


def window_slots(config: QwenConfig, cache_len: int) -> int:
  """Slots of the dense window a cache of `cache_len` slots keeps (0: none, a short cache)."""
  return WINDOW_BLOCKS * config.attn_block if reads_live_blocks(config, cache_len, 1) else 0


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = dtype or config.dtype
  shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
  w = window_slots(config, max_len)
  win = jnp.zeros(shape[:3] + (w,) + shape[4:], dtype) if w else None
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch, max_len), bool),
      k_win=win, v_win=win,
  )


def with_window(config: QwenConfig, cache: KVCache) -> KVCache:
  """`cache` with the window its length calls for, built from its first slots if missing."""
  w = window_slots(config, cache.valid.shape[1])
  if not w:
    return cache._replace(k_win=None, v_win=None)
  if cache.k_win is not None:
    return cache
  if is_unstacked(cache.k):  # keys [B, K, Dh, S], values [B, K, S, Dh]
    return cache._replace(k_win=tuple(k[..., :w] for k in cache.k),
                          v_win=tuple(v[:, :, :w] for v in cache.v))
  return cache._replace(k_win=cache.k[:, :, :, :w], v_win=cache.v[:, :, :, :w])


def unstack_cache(cache: KVCache) -> KVCache:
  """Stacked k/v -> per-layer tuples, keys transposed to [B, K, Dh, S] (one copy). Idempotent."""
  if isinstance(cache.k, (tuple, list)):
    return cache
  n = cache.k.shape[0]
  keys = lambda c: tuple(jnp.swapaxes(c[i], -1, -2) for i in range(n))
  values = lambda c: tuple(c[i] for i in range(n))
  return cache._replace(k=keys(cache.k), v=values(cache.v),
                        k_win=None if cache.k_win is None else keys(cache.k_win),
                        v_win=None if cache.v_win is None else values(cache.v_win))


def stack_cache(cache: KVCache) -> KVCache:
  """Inverse of `unstack_cache`."""
  if not isinstance(cache.k, (tuple, list)):
    return cache
  keys = lambda c: jnp.stack([jnp.swapaxes(k, -1, -2) for k in c])
  return cache._replace(k=keys(cache.k), v=jnp.stack(cache.v),
                        k_win=None if cache.k_win is None else keys(cache.k_win),
                        v_win=None if cache.v_win is None else jnp.stack(cache.v_win))


def pad_cache(cache: KVCache, max_len: int) -> KVCache:
  """Appends empty (invalid) slots up to `max_len`, in either layout (the window, if any,
  is kept: `with_window` adds one)."""
  extra = max_len - cache.valid.shape[1]
  if extra < 0:
    raise ValueError(f"pad_cache: cache has {cache.valid.shape[1]} slots > max_len {max_len}")

  def grow(a, axis):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)

  per_layer = isinstance(cache.k, (tuple, list))
  return cache._replace(
      k=tuple(grow(k, -1) for k in cache.k) if per_layer else grow(cache.k, -2),
      v=tuple(grow(v, -2) for v in cache.v) if per_layer else grow(cache.v, -2),
      valid=grow(cache.valid, 1),
  )


# ----- building blocks ----------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def _rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin [B, T, Dh/2] (f32) for positions [B, T]; computed once per pass, not per layer."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  # The barrier asks XLA not to fuse (and so re-evaluate) cos/sin into every layer's use.
  # Compiled forward+backward: XLA:TPU holds one cosine with or without it; XLA:CPU drops
  # barriers before fusion and recomputes them per layer (~5 % of the tiny model's pass).
  return jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, ..., Dh]; cos, sin: [B, T, Dh/2]. HF 'rotate_half' convention."""
  shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[-1:]
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' convention. x: [B, T, ..., Dh]; positions: [B, T]."""
  return _apply_rope(x, *_rope_tables(positions, x.shape[-1], theta))


def _dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """einsum of activations with a weight.

  Weights narrower than the activations (bf16 weights, f32 compute) multiply in the
  weight dtype with accumulation in the activation dtype: half the bytes read per
  decode step, and no per-call upcast copy of the weights. Otherwise the weight is cast
  to the activation dtype (a no-op when they agree).
  """
  if w.dtype != x.dtype and jnp.finfo(w.dtype).bits < jnp.finfo(x.dtype).bits:
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=x.dtype)
  return jnp.einsum(spec, x, w.astype(x.dtype))


def _project_qkv(config: QwenConfig, lp: dict, x: jax.Array, rope_cs):
  """x: [B, T, D] -> q [B, T, K, R, Dh], k and v [B, T, K, Dh] (RoPE applied)."""
  r, (b, t, d) = config.group_size, x.shape
  w = lp["qkv"]
  qkv = _dot("btd,de->bte", x, w.reshape(d, -1)).reshape((b, t) + w.shape[1:])  # one matmul
  if config.qkv_bias:
    qkv = qkv + lp["qkv_bias"].astype(x.dtype)
  q, k, v = qkv[..., :r, :], qkv[..., r, :], qkv[..., r + 1, :]
  if config.qk_norm:
    q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
  q = _apply_rope(q, *rope_cs)
  k = _apply_rope(k, *rope_cs)
  return q, k, v


def _attend(config: QwenConfig, q, k, v, mask, k_transposed: bool = False) -> jax.Array:
  """q: [B, T, K, R, Dh]; k: [B, K, S, Dh] (or [B, K, Dh, S] if k_transposed);
  v: [B, K, S, Dh]; mask: [B, T, S] -> [B, T, K * R * Dh].

  Written as batched matmuls over (B, K) with the R query heads of a group and the T
  positions merged into one row dimension, operands in the order XLA wants, so no
  weight or cache ends up transposed (for T = 1 every reshape here is free).
  """
  b, t, kh, r, dh = q.shape
  scale = config.head_dim**-0.5
  qg = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, r * t, dh)  # [B, K, R*T, Dh]
  batch = ((0, 1), (0, 1))
  k_contract = 2 if k_transposed else 3
  scores = jax.lax.dot_general(qg, k, (((3,), (k_contract,)), batch),
                               preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kh, r, t, -1)
  scores = jnp.where(mask[:, None, None], scores * scale, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kh, r * t, -1)
  out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch))  # [B, K, R*T, Dh]
  return out.reshape(b, kh, r, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, kh * r * dh)


class LiveSlots(NamedTuple):
  """What cached attention needs to read only the live part of the cache, block by block.

  valid: [B, S] slots holding a token (after this call's writes); q_slots: [B, T] each
  query's own slot; n_blocks: [] int32, the blocks of `attn_block` slots that hold any slot
  <= the largest query slot (the batch's live length), the traced trip count.
  """

  valid: jax.Array
  q_slots: jax.Array
  n_blocks: jax.Array
  # With a cache window (`KVCache.k_win`): the dense mask [B, T, W] of its slots; else None.
  window_mask: Any = None


# A cache of at most this many blocks is read in one dense pass. The live-block loop pays a
# fixed cost per block (slices, online-softmax rescaling, a loop trip), which on short caches
# outweighs the slots it skips (CPU, S = 512: the live step cost 1.2x the dense one).
DENSE_MAX_BLOCKS = 4


def reads_live_blocks(config: QwenConfig, cache_len: int, t: int) -> bool:
  """Static choice of the cached attention path: live blocks for a long cache, else dense.

  Prefill into a cache of its own length (t == cache_len) is always one dense pass.
  """
  return t < cache_len and cache_len > DENSE_MAX_BLOCKS * config.attn_block


def live_slots(config: QwenConfig, valid: jax.Array, q_slots: jax.Array,
               window: int = 0) -> LiveSlots:
  s, bs = valid.shape[1], config.attn_block
  live = jnp.minimum(jnp.max(q_slots) + 1, s)
  n_blocks = ((live + bs - 1) // bs).astype(jnp.int32)
  if not window:
    return LiveSlots(valid, q_slots, n_blocks)
  mask = (jnp.arange(window)[None, None, :] <= q_slots[:, :, None]) & valid[:, None, :window]
  return LiveSlots(valid, q_slots, n_blocks, mask)


def _read_block(c: jax.Array, start, size: int, layer, slot_last: bool) -> jax.Array:
  """`size` slots from `start` of one layer's cache (c per-layer, or stacked with `layer`)."""
  if layer is not None:  # [L, B, K, S, Dh]
    idx = (layer, 0, 0, start, 0)
    return jax.lax.dynamic_slice(c, idx, (1,) + c.shape[1:3] + (size,) + c.shape[4:])[0]
  return jax.lax.dynamic_slice_in_dim(c, start, size, axis=3 if slot_last else 2)


def _attend_live(config: QwenConfig, q, kv: tuple, live: LiveSlots, layer=None,
                 k_transposed: bool = False) -> jax.Array:
  """`_attend` over the cache's first `live.n_blocks` blocks with an online softmax.

  Same operands as `_attend` (kv = (k, v), one layer's cache or stacked with `layer` its
  index), but the cost follows the live length instead of S: blocks past the largest query
  slot are never read. The last block's start is clamped into the cache (S need not be a
  multiple of the block), and slots an earlier block already covered are masked out.
  With a window (kv = (k, v, k_win, v_win)), slots below it are read from the window in one
  dense pass (its result starts the online softmax) and the loop starts after it, so a
  call whose live length fits the window reads no block of k / v.
  """
  b, t, kh, r, dh = q.shape
  s, bs = live.valid.shape[1], config.attn_block
  scale = config.head_dim**-0.5
  qg = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, r * t, dh)
  batch = ((0, 1), (0, 1))
  k_contract = 2 if k_transposed else 3

  def attend_part(carry, kb, vb, ok):
    """Online-softmax update of carry (m, l, acc) with key/value slots kb, vb where ok."""
    m, l, acc = carry
    n = ok.shape[-1]
    scores = jax.lax.dot_general(qg, kb.astype(q.dtype), (((3,), (k_contract,)), batch),
                                 preferred_element_type=jnp.float32).reshape(b, kh, r, t, n)
    ok = ok[:, None, None]  # [B, 1, 1, T, n]
    scores = jnp.where(ok, scores * scale, _MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(ok, jnp.exp(scores - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jax.lax.dot_general(p.astype(q.dtype).reshape(b, kh, r * t, n), vb.astype(q.dtype),
                             (((3,), (2,)), batch), preferred_element_type=jnp.float32)
    acc = acc * corr[..., None] + pv.reshape(b, kh, r, t, dh)
    return m_new, l * corr + p.sum(-1), acc

  def body(i, carry):
    first = i * bs
    start = jnp.minimum(first, s - bs)
    slot = start + jnp.arange(bs)
    ok = (jax.lax.dynamic_slice_in_dim(live.valid, start, bs, axis=1)[:, None, :]
          & (slot[None, None, :] <= live.q_slots[:, :, None]) & (slot >= first)[None, None])
    return attend_part(carry, _read_block(kv[0], start, bs, layer, k_transposed),
                       _read_block(kv[1], start, bs, layer, False), ok)

  carry = (jnp.full((b, kh, r, t), _MASK_VALUE, jnp.float32),
           jnp.zeros((b, kh, r, t), jnp.float32), jnp.zeros((b, kh, r, t, dh), jnp.float32))
  first_block = 0
  if len(kv) == 4:
    kw, vw = kv[2:]
    if layer is not None:
      kw, vw = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (kw, vw))
    carry = attend_part(carry, kw, vw, live.window_mask)
    first_block = live.window_mask.shape[-1] // bs
  _, l, acc = jax.lax.fori_loop(first_block, live.n_blocks, body, carry)
  out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)  # no valid key: zeros
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * r * dh)


def _mlp(lp: dict, x: jax.Array) -> jax.Array:
  # One matmul for gate and up; their [2] axis stays its own dimension, so with F split
  # over devices (tensor parallel) taking gate and up apart moves nothing between them.
  gu = _dot("btd,dkf->btkf", x, lp["gate_up"])  # gate_up: [D, 2, F]
  g, u = gu[..., 0, :], gu[..., 1, :]
  return _dot("btf,fd->btd", jax.nn.silu(g) * u, lp["down"])


def _write_kv(c: jax.Array, new: jax.Array, slots: jax.Array, layer=None,
              slot_last: bool = False) -> jax.Array:
  """Scatters new [B, T, K, Dh] into cache c at slots [B, T] in place; slots >= S are dropped.

  c is one layer's [B, K, S, Dh] ([B, K, Dh, S] with slot_last), or the stacked
  [L, B, K, S, Dh] with `layer` given. Written per row under vmap, so the scatter carries
  the rows as a batch dimension and a row-split cache is written without collectives.
  """
  new = new.astype(c.dtype)
  if layer is not None:
    return jax.vmap(lambda c, n, s: c.at[layer, :, s].set(n, mode="drop"),
                    in_axes=(1, 0, 0), out_axes=1)(c, new, slots)
  if slot_last:
    return jax.vmap(lambda c, n, s: c.at[:, :, s].set(n.transpose(1, 2, 0), mode="drop"))(
        c, new, slots)
  return jax.vmap(lambda c, n, s: c.at[:, s].set(n.transpose(1, 0, 2), mode="drop"))(
      c, new, slots)


def set_at_slots(x: jax.Array, slots: jax.Array, values) -> jax.Array:
  """x [B, S, ...] with x[b, slots[b, t]] = values[b, t] (slots [B] or [B, T]; >= S dropped).

  Per row under vmap (rows are a batch dimension of the scatter: no collectives when the
  rows are split over devices).
  """
  values = jnp.broadcast_to(jnp.asarray(values, x.dtype), slots.shape + x.shape[2:])
  return jax.vmap(lambda r, s, v: r.at[s].set(v, mode="drop"))(x, slots, values)


def _layer(config: QwenConfig, lp: dict, x, rope_cs, mask, kv=None, slots=None, layer=None):
  """One decoder layer. Without a cache (kv None) attends within x.

  With a cache (kv = (k, v), or (k, v, k_win, v_win) with its window; one layer's or stacked
  with `layer` its index), scatters this call's k/v at `slots` [B, T] and attends to the
  cache: to all of it when `mask` is an array (it already covers validity and causality by
  slot; the window, if any, is written too, slots past it dropped), or as `_attend_live` when
  `mask` is a `LiveSlots` (then slots below the window are written to the window only).
  """
  lp, x = fsdp.gather(config.fsdp, lp, config.dtype), fsdp.rows(config.fsdp, x)
  h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
  q, k, v = _project_qkv(config, lp, h, rope_cs)
  per_layer = kv is not None and layer is None  # keys stored [B, K, Dh, S]
  if kv is None:
    k_att, v_att = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
  else:
    long_slots = slots
    if isinstance(mask, LiveSlots) and mask.window_mask is not None:  # below it: window only
      s, w = mask.valid.shape[1], mask.window_mask.shape[-1]
      long_slots = jnp.where(slots < w, s, slots)  # slot S: dropped
    # Buffers alternate keys and values: k, v[, k_win, v_win].
    kv = tuple(_write_kv(c, v if i % 2 else k, slots if i > 1 else long_slots, layer,
                         slot_last=per_layer and not i % 2) for i, c in enumerate(kv))
    ck, cv = kv[:2]
  if isinstance(mask, LiveSlots):
    attn = _attend_live(config, q, kv, mask, layer, k_transposed=per_layer)
  else:
    if kv is not None:
      if layer is not None:
        ck, cv = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in kv)
      k_att, v_att = ck.astype(x.dtype), cv.astype(x.dtype)
    attn = _attend(config, q, k_att, v_att, mask, k_transposed=per_layer)  # [B, T, K*R*Dh]
  x = x + _dot("bte,ed->btd", attn, lp["o"].reshape(-1, lp["o"].shape[-1]))
  x = x + _mlp(lp, rms_norm(x, lp["mlp_norm"], config.rms_norm_eps))
  return x, kv


def is_unstacked(tree) -> bool:
  """True for per-layer tuples (params['layers'] or KVCache.k), False for stacked arrays."""
  return isinstance(tree, (tuple, list))


def unstack_layers(params: dict) -> dict:
  """params with 'layers' as a tuple of per-layer dicts (the unrolled decode layout).

  Stacked layers run under `lax.scan`, whose per-layer dynamic slices of the weights XLA:CPU
  copies on every step; a tuple runs as an unrolled loop that reads each weight in place.
  Costs one copy of the layer weights. Idempotent.
  """
  layers = params["layers"]
  if is_unstacked(layers):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], layers) for i in range(n))}


def stack_layers(params: dict) -> dict:
  """Inverse of `unstack_layers`."""
  layers = params["layers"]
  if not is_unstacked(layers):
    return params
  return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def _layer_params(layers, i: int) -> dict:
  return layers[i] if is_unstacked(layers) else jax.tree.map(lambda a: a[i], layers)


# Stacked layers of a model this shallow run unrolled too: a scan's per-layer weight slices and
# its stacked residuals (zero-filled [L, ...] buffers, written and read per layer) cost more
# than the compile time it saves (CPU, the demo's 2-layer GRPO update: ~15 % of its time).
UNROLL_MAX_LAYERS = 4


def _run_layers(config: QwenConfig, params, x, rope_cs, mask, kv=None, slots=None):
  """All decoder layers; kv = the cache's buffers (k, v[, k_win, v_win]) or None. Returns (x, kv).

  Scans when the layers and the cache are stacked and there are more than
  `UNROLL_MAX_LAYERS`; otherwise runs an unrolled loop (per-layer tuples are read in place,
  stacked ones by static slices).
  """
  layers = params["layers"]
  unrolled = (is_unstacked(layers) or (kv is not None and is_unstacked(kv[0]))
              or config.num_layers <= UNROLL_MAX_LAYERS)
  layer_fn = _layer
  if config.remat:
    layer_fn = jax.checkpoint(_layer, static_argnums=(0,), prevent_cse=False)
  if not unrolled:
    def body(carry, xs):
      x, kv = carry
      lp, i = xs
      x, kv = layer_fn(config, lp, x, rope_cs, mask, kv, slots, None if kv is None else i)
      return (x, kv), None

    (x, kv), _ = jax.lax.scan(body, (x, kv), (layers, jnp.arange(config.num_layers)))
    return x, kv
  for i in range(config.num_layers):
    lp = _layer_params(layers, i)
    if kv is None:
      x, _ = layer_fn(config, lp, x, rope_cs, mask)
    elif is_unstacked(kv[0]):
      x, new = layer_fn(config, lp, x, rope_cs, mask, tuple(c[i] for c in kv), slots)
      kv = tuple(c[:i] + (n,) + c[i + 1:] for c, n in zip(kv, new))
    else:
      x, kv = layer_fn(config, lp, x, rope_cs, mask, kv, slots, i)
  return x, kv


def _embed(config: QwenConfig, params, tokens):
  table = fsdp.gather(config.fsdp, {"embed": params["embed"]}, config.dtype)["embed"]
  return fsdp.rows(config.fsdp, table[tokens].astype(config.dtype))


def logits_from_hidden(config: QwenConfig, params, h: jax.Array) -> jax.Array:
  """Final-normed hidden [..., D] -> f32 logits [..., V]."""
  name = "embed" if config.tie_word_embeddings else "lm_head"
  spec = "...d,vd->...v" if config.tie_word_embeddings else "...d,dv->...v"
  w = fsdp.gather(config.fsdp, {name: params[name]}, h.dtype)[name]
  if w.dtype != h.dtype and jnp.finfo(w.dtype).bits < jnp.finfo(h.dtype).bits:
    h = h.astype(w.dtype)
  return jnp.einsum(spec, h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions that count only real tokens (0 for left padding)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """RoPE positions of packed rows: each segment counts from 0 at its first slot.

  segment_ids [B, T] (0 = padding, equal ids = one sequence, segments contiguous).
  """
  t = segment_ids.shape[-1]
  slot = jnp.arange(t, dtype=jnp.int32)
  prev = jnp.concatenate([jnp.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], axis=1)
  starts = jnp.where(segment_ids != prev, slot, 0)
  return slot - jax.lax.cummax(starts, axis=1)


def _attention_mask(t: int, attention_mask: jax.Array, segment_ids=None,
                    prefix_ids=None) -> jax.Array:
  """[B, T, T]: causal, to valid keys, and (packed rows) within the query's segment or
  its prefix segment."""
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
      same |= prefix_ids[:, :, None] == segment_ids[:, None, :]
    mask &= same
  return mask


# ----- public entry points --------------------------------------------------------------


def hidden_states(config: QwenConfig, params, tokens, positions=None, attention_mask=None,
                  segment_ids=None, prefix_ids=None):
  """Uncached pass: tokens [B, T] -> final-normed hidden states [B, T, D].

  `segment_ids` [B, T] marks packed rows (several sequences per row, 0 = padding): tokens
  attend only within their segment and, unless `positions` is given, RoPE positions restart
  at 0 per segment, so each segment computes what it would alone in its own row.
  `prefix_ids` [B, T] (with segment_ids and positions): a slot also attends to the segment
  named there (0: none), e.g. responses packed after the one copy of their shared prompt.
  """
  if prefix_ids is not None and (segment_ids is None or positions is None):
    raise ValueError("hidden_states: prefix_ids needs segment_ids and positions")
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = (jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = (default_positions(attention_mask) if segment_ids is None
                 else segment_positions(segment_ids))
  mask = _attention_mask(t, attention_mask, segment_ids, prefix_ids)
  rope_cs = _rope_tables(positions, config.head_dim, config.rope_theta)
  x, _ = _run_layers(config, params, _embed(config, params, tokens), rope_cs, mask)
  return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def forward(config: QwenConfig, params, tokens, positions=None, attention_mask=None,
            segment_ids=None):
  """Uncached pass: tokens [B, T] -> f32 logits [B, T, V] (`segment_ids`: packed rows)."""
  h = hidden_states(config, params, tokens, positions, attention_mask, segment_ids)
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
  Writes the valid tokens' k/v at slots start[b] + (0..T-1) in place and marks them valid;
  invalid tokens (padding, finished rows) write nothing, and slots >= S are dropped, so a
  padded or finished row never disturbs its cache. Each query attends to valid slots at or
  before its own slot. When the cache holds more than `DENSE_MAX_BLOCKS` blocks of
  `config.attn_block` slots and more than T (`reads_live_blocks`, static), attention reads it
  in blocks only up to the batch's largest query slot (the live length, start + T), so a
  step's cost follows the live tokens, not S; shorter caches take one dense pass. A long
  cache with its window (`with_window`) keeps the slots below the window there: the blocks
  pass reads them in one dense pass over the window, then only the live blocks past it.
  Returns (final-normed hidden [B, T, D], updated cache).
  Works with stacked or per-layer (`unstack_layers`, tuple `KVCache.k/v`) layouts.
  """
  b, t = tokens.shape
  s = cache.valid.shape[1]
  slots = start[:, None] + jnp.arange(t, dtype=start.dtype)[None]  # [B, T]
  write_slots = jnp.where(token_valid.astype(bool), slots, s)
  valid = set_at_slots(cache.valid, write_slots, True)
  windowed = cache.k_win is not None
  if reads_live_blocks(config, s, t):  # decode and appends into a long cache
    mask = live_slots(config, valid, slots, window_slots(config, s) if windowed else 0)
  else:  # prefill, or a short cache: one dense pass
    mask = (jnp.arange(s)[None, None, :] <= slots[:, :, None]) & valid[:, None, :]
  rope_cs = _rope_tables(positions, config.head_dim, config.rope_theta)
  x = _embed(config, params, tokens)
  bufs = (cache.k, cache.v) + ((cache.k_win, cache.v_win) if windowed else ())
  x, bufs = _run_layers(config, params, x, rope_cs, mask, bufs, write_slots)
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  return h, KVCache(*bufs[:2], valid, *bufs[2:])


# ----- value model (PPO critic) -----------------------------------------------------------


def init_value_head(config: QwenConfig, key: jax.Array) -> jax.Array:
  """Linear(hidden, 1, bias=False) head, init normal with STD 1/(hidden+1) (OpenRLHF)."""
  std = 1.0 / (config.hidden_size + 1)
  return std * jax.random.normal(key, (config.hidden_size,), jnp.float32)


def value_forward(config: QwenConfig, params, tokens, positions=None, attention_mask=None,
                  segment_ids=None):
  """Critic: backbone + value head. params = {'backbone': ..., 'value_head': [D]} -> [B, T]."""
  h = hidden_states(config, params["backbone"], tokens, positions, attention_mask, segment_ids)
  head = fsdp.gather(config.fsdp, {"value_head": params["value_head"]}, jnp.float32)
  return jnp.einsum("btd,d->bt", h.astype(jnp.float32), head["value_head"].astype(jnp.float32))
