"""One optimizer step from a batch, with gradients accumulated over micro-batches.

Model-agnostic: the PPO actor, the PPO critic and the GRPO/LTE actor all plug their
`loss_fn(params, micro_batch, *extra) -> (loss, metrics)` in here.

Accumulation takes the mean of the micro-batch gradients. When the loss is a mean over
examples (or tokens) and the micro-batches hold equally many of them, that equals the
gradient of the full-batch loss. With token means over micro-batches of unequal token
counts it does not; pass a global normaliser to the loss (losses.aggregate's group_norm =
mini-batch count / num_micro_batches) when the exact mini-batch mean is wanted.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
import optax

from mar.rl import optim

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def split_micro_batches(batch: Any, num_micro_batches: int) -> Any:
  """Reshapes every leaf [N, ...] to [M, N / M, ...]; N must be divisible by M."""

  def split(path, x):
    n = x.shape[0] if x.ndim else None
    if n is None or n % num_micro_batches:
      raise ValueError(
          f"update.py: batch field {jax.tree_util.keystr(path)} has leading size {n}, "
          f"expected a multiple of num_micro_batches={num_micro_batches}"
      )
    return x.reshape((num_micro_batches, n // num_micro_batches) + x.shape[1:])

  return jax.tree_util.tree_map_with_path(split, batch)


def chunk_count(rows: int, max_rows: int, shards: int = 1) -> int:
  """Chunks to cut `rows` rows into, each of at most `max_rows` rows where the row count
  allows: the fewest that divide `rows` into equal chunks whose rows split evenly over
  `shards` (else the most such chunks). max_rows <= 0: one chunk."""
  if max_rows <= 0 or rows <= max_rows:
    return 1
  shards = shards if rows % shards == 0 else 1
  counts = [m for m in range(1, rows // shards + 1) if rows % m == 0 and rows // m % shards == 0]
  need = -(-rows // max_rows)
  return min((m for m in counts if m >= need), default=max(counts))


def map_rows(fn: Callable, batch: Any, max_rows: int, shards: int = 1) -> Any:
  """fn(batch) computed over chunks of at most `max_rows` rows (`chunk_count`), one after
  the other (`lax.map`), so only one chunk's activations are live; outputs (leading axis
  rows) re-joined in row order. fn must treat rows independently (a forward pass).

  Chunk k holds rows k, k + M, k + 2M, ... (M chunks): a batch whose rows are split over
  devices in contiguous blocks then splits into chunks locally, with no row moving
  between devices.
  """
  n = jax.tree.leaves(batch)[0].shape[0]
  m = chunk_count(n, max_rows, shards)
  if m == 1:
    return fn(batch)
  strided = jax.tree.map(lambda x: x.reshape((n // m, m) + x.shape[1:]).swapaxes(0, 1), batch)
  out = jax.lax.map(fn, strided)
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((n,) + y.shape[2:]), out)


def make_update_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    num_micro_batches: int = 1,
    accum_dtype: Any = jnp.float32,
    micro_rows: int | None = None,
) -> Callable[..., tuple[Any, Any, dict[str, Array]]]:
  """Builds update(params, opt_state, batch, *extra) -> (params, opt_state, metrics).

  `batch` is a pytree of arrays with a common leading batch axis; `extra` (e.g. a model
  config, a reference, an rng) is passed to every micro-batch call unchanged. Metrics are
  the loss_fn metrics averaged over micro-batches plus `loss`, `grad_norm` (global norm of
  the accumulated gradient, before clipping), `skipped` (1.0 when the gradient was not
  finite; the optimizer from optim.make_optimizer then leaves params and state unchanged)
  and, for such an optimizer, `num_skipped` so far. The returned function is not jitted:
  jit it with donation, `jax.jit(update, donate_argnums=(0, 1))`.

  `micro_rows` (packed batches, `rl.packing`): micro-batches of that many rows instead of
  a fixed count; a batch of at most `micro_rows` rows is one micro-batch. The count then
  follows the batch's (static) row count.
  """
  if num_micro_batches < 1:
    raise ValueError(f"update.py: num_micro_batches must be >= 1, found {num_micro_batches}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(params, opt_state, batch, *extra):
    num = num_micro_batches
    if micro_rows is not None:
      num = max(jax.tree.leaves(batch)[0].shape[0] // micro_rows, 1)
    micro = split_micro_batches(batch, num)
    zeros = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, accum_dtype)), params
    )

    def body(acc, mb):
      (loss, metrics), grads = grad_fn(params, mb, *extra)
      acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
      return acc, dict(metrics, loss=loss)

    grad_sum, metrics = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g, p: (g / num).astype(p.dtype), grad_sum, params)
    metrics = {k: _reduce(k, jnp)(m.astype(jnp.float32), axis=0) for k, m in metrics.items()}

    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["skipped"] = jnp.logical_not(optim.tree_all_finite(grads)).astype(jnp.float32)
    count = optim.num_skipped(opt_state)
    if count is not None:
      metrics["num_skipped"] = count.astype(jnp.float32)
    return params, opt_state, metrics

  return update


def _reduce(name: str, xp):
  """How a metric combines over micro- and mini-batches: a `*_max` is a max, others a mean."""
  return xp.max if name.endswith("_max") else xp.mean


def mean_metrics(history: list[dict]) -> dict:
  """Averages per-update metric dicts on the host (values may live on any devices);
  metrics named `*_max` take the max instead."""
  host = jax.device_get(history)
  return {k: float(_reduce(k, np)([h[k] for h in host])) for k in host[0]}


def first_approx_kl(history: list[dict], key: str = "approx_kl") -> float:
  """train/first_minibatch_approx_kl: the approx-KL of the step's first mini-batch alone.

  Its pi is still pi_old (nothing updated yet), so the value is ~0 when the learner scores
  as it updates; the mean over all mini-batches would hide a ratio that is not 1 there. A
  mini-batch of several micro-batches gives the mean of their token means (as `key` is
  reduced over micro-batches in `make_update_step`).
  """
  return float(jax.device_get(history[0][key]))


def mini_batches(batch: Any, num: int, split_fn: Callable | None = None) -> list:
  """Cuts a batch into `num` equal row slices, one optimizer step each.

  On a mesh pass `split_fn(batch, num) -> [num, rows/num, ...]` (one jitted program):
  eagerly slicing row-sharded arrays between update programs can deadlock XLA:CPU's
  collectives, while indexing the split result is a local slice.
  """
  if split_fn is not None:
    split = jax.block_until_ready(split_fn(batch, num))
    return [jax.tree.map(lambda x: x[i], split) for i in range(num)]
  size = jax.tree.leaves(batch)[0].shape[0]
  mb = size // num
  return [jax.tree.map(lambda x: x[i * mb:(i + 1) * mb], batch) for i in range(num)]
