"""FSDP inside the model: gather each weight where a layer uses it, reduce-scatter its gradient.

On a training mesh the weights are stored split over the mesh axes the batch also uses
('fsdp'; `sharding.DEFAULT_RULES` maps `embed -> fsdp`). Left alone, XLA's SPMD partitioner
keeps a projection's weight split and all-gathers the *activations* of every 'fsdp' shard's
rows instead, then all-reduces the projection's output (bench/README.md, "FSDP"). With a
`FsdpLayout` in `QwenConfig.fsdp` (the learners' model config, `sharding.with_fsdp`):

* `in_layer` runs a training layer per device on its rows (`shard_map`, manual over the
  batch axes): each FSDP-split weight is cast to the compute dtype and all-gathered there,
  in the forward and again in the rematerialised backward, one layer at a time; the
  gather's transpose reduce-scatters the weight's gradient, so each device reduces only
  its own slice. Gradients of unsplit weights (norms, biases) are summed (an all-reduce).
* Elsewhere (the embedding and LM head, rows that do not split evenly) `gather` casts a
  weight and constrains it to its gathered layout; its custom VJP constrains the gradient
  back to the stored layout, which XLA (CPU and TPU, jax 0.10.2) reduces with an all-reduce
  of the whole gradient and a local slice. `rows` keeps activations split by rows there.

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


def _manual(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
  """`spec` with only the mesh axes in `axes` (the manual ones of `in_layer`)."""
  out = []
  for e in spec:
    kept = tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a in axes)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*out)


def layer_rows_local(layout: FsdpLayout | None, x: jax.Array) -> bool:
  """Whether `in_layer` applies: a layout, and rows that split evenly over its batch axes."""
  return layout is not None and x.shape[0] % math.prod(
      layout.mesh.shape[a] for a in layout.batch_axes) == 0


def in_layer(layout: FsdpLayout, fn, weights: dict, x: jax.Array, *row_args, dtype):
  """fn(gathered weights, x, *row_args) -> x, run per device on its rows (`shard_map`,
  manual over the batch axes; 'tensor' stays automatic).

  Each FSDP-split weight is cast to the compute dtype (matrices) and all-gathered over the
  batch axes inside, so the backward's transpose of the gather is a reduce-scatter of the
  weight's gradient (each device reduces only its own slice), not an all-reduce of the
  whole gradient followed by a slice, which is what `gather`'s constraints leave to XLA.
  Weights not split over the batch axes come in whole; their gradients are summed.
  """
  axes = layout.batch_axes
  rows = PartitionSpec(axes)
  specs, dims = {}, {}
  for name, w in weights.items():
    stored = layout.specs(name)
    spec = _manual(stored[0], axes) if stored is not None else PartitionSpec()
    specs[name] = spec
    split = [d for d, e in enumerate(spec) if e is not None]
    dims[name] = (split[0], spec[split[0]]) if split else None

  def body(ws, x_, *args):
    out = {}
    for name, w in ws.items():
      cast = (dtype if w.ndim >= 2 and jnp.finfo(dtype).bits < jnp.finfo(w.dtype).bits
              else w.dtype)
      w = w.astype(cast)
      if dims[name] is not None:
        d, axis = dims[name]
        w = jax.lax.all_gather(w, axis, axis=d, tiled=True)
      out[name] = w
    return fn(out, x_, *args)

  row_specs = jax.tree.map(lambda _: rows, row_args)
  mesh = layout.mesh
  # Every axis manual when the others have size 1 (XLA handles a fully manual region best).
  manual = (frozenset(mesh.axis_names)
            if all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in axes)
            else frozenset(axes))
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, rows, *row_specs),
                       out_specs=rows, axis_names=manual)(weights, x, *row_args)
