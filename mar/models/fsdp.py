"""FSDP inside the model: gather each weight where a layer uses it, reduce-scatter its gradient.

On a training mesh the weights are stored split over the mesh axes the batch also uses
('fsdp'; `sharding.DEFAULT_RULES` maps `embed -> fsdp`). Left alone, XLA's SPMD partitioner
keeps a projection's weight split and all-gathers the *activations* of every 'fsdp' shard's
rows instead, then all-reduces the projection's output (bench/README.md, "FSDP"). With a
`FsdpLayout` in `QwenConfig.fsdp` (the learners' model config, `sharding.with_fsdp`):

* `gather` casts a weight to the compute dtype and constrains it to its gathered layout
  inside the (rematerialised) layer, so each layer all-gathers its own weights in the
  forward and again in the backward, one layer at a time; its custom VJP constrains the
  weight's gradient back to the stored layout. XLA (CPU and TPU, jax 0.10.2) reduces the
  layer's gradients with one all-reduce (on TPU in the compute dtype) and keeps the local
  slice, rather than a reduce-scatter (bench/README.md counts them);
* `rows` keeps the activations split by rows over the batch axes, so the matmuls run on
  local rows against the gathered weights.

The numbers are those of the unconstrained program: only where they live changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class FsdpLayout:
  """Stored and gathered layouts of the weights split over the batch's mesh axes.

  weights: (name, stored spec, gathered spec) per weight; a layer's weights without their
  stacked layer dimension (names are unique across the layer and top-level weights).
  """

  mesh: Any  # jax.sharding.Mesh (hashable: the model config is a static argument)
  batch_axes: tuple[str, ...]  # mesh axes rows are split over, in order
  weights: tuple[tuple[str, PartitionSpec, PartitionSpec], ...]

  def specs(self, name: str):
    for n, stored, gathered in self.weights:
      if n == name:
        return stored, gathered
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather(w, stored: NamedSharding, gathered: NamedSharding, dtype):
  return jax.lax.with_sharding_constraint(w.astype(dtype), gathered)


def _gather_fwd(w, stored, gathered, dtype):
  return _gather(w, stored, gathered, dtype), jnp.zeros((), w.dtype)


def _gather_bwd(stored, gathered, dtype, res, ct):
  del gathered, dtype
  # The gradient of the local rows is a partial sum; constrained to the stored (split)
  # layout, XLA reduces it and keeps this device's slice.
  return (jax.lax.with_sharding_constraint(ct.astype(res.dtype), stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather(layout: FsdpLayout | None, weights: dict, dtype) -> dict:
  """`weights` (a layer's, or the top-level params) with each FSDP-split weight gathered.

  Matrices narrower in `dtype` are cast first (as the matmuls would cast them), so the
  gathers move compute-dtype bytes; vectors keep their dtype.
  """
  if layout is None:
    return weights
  out = dict(weights)
  for name, w in weights.items():
    specs = layout.specs(name)
    if specs is None or not hasattr(w, "ndim"):
      continue
    cast = dtype if w.ndim >= 2 and jnp.finfo(dtype).bits < jnp.finfo(w.dtype).bits else w.dtype
    out[name] = _gather(w, NamedSharding(layout.mesh, specs[0]),
                        NamedSharding(layout.mesh, specs[1]), jnp.dtype(cast))
  return out


def rows(layout: FsdpLayout | None, x: jax.Array) -> jax.Array:
  """x [B, ...] constrained to rows split over the batch axes that divide B."""
  if layout is None:
    return x
  kept = []
  for a in layout.batch_axes:
    if x.shape[0] % (math.prod(layout.mesh.shape[k] for k in kept) * layout.mesh.shape[a]) == 0:
      kept.append(a)
  spec = PartitionSpec(tuple(kept) if kept else None, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))
