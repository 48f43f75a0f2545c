"""Named-axis sharding for the Qwen params, KV cache and batches.

Every array dimension gets a *logical* name ('vocab', 'embed', 'kv_heads', ...); a rules
table maps logical names to mesh axes ('data', 'fsdp', 'tensor'). Changing how a model is
split is then a config change (the rules), not a code change. A mapping is dropped for a
dimension the mesh axes do not divide, so tiny test models still shard (that dimension is
replicated instead of failing to compile).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mar.models.config import QwenConfig
from mar.models.fsdp import FsdpLayout
from mar.models.init import param_shapes
from mar.models.model import KVCache

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
)

Rules = Sequence[tuple[str, Any]]


def param_logical_axes(config: QwenConfig) -> dict:
  """Logical axis names of every parameter, keyed like the params pytree."""
  layers = {
      "attn_norm": ("layers", None),
      "qkv": ("layers", "embed", "kv_heads", None, "head_dim"),
      "o": ("layers", "kv_heads", None, "head_dim", "embed"),
      "mlp_norm": ("layers", None),
      "gate_up": ("layers", "embed", None, "mlp"),
      "down": ("layers", "mlp", "embed"),
  }
  if config.qkv_bias:
    layers["qkv_bias"] = ("layers", "kv_heads", None, "head_dim")
  if config.qk_norm:
    layers["q_norm"] = ("layers", None)
    layers["k_norm"] = ("layers", None)
  axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": (None,)}
  if not config.tie_word_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def cache_logical_axes(config: QwenConfig, per_layer: bool = False) -> KVCache:
  """Logical axes of a `KVCache` (k, v: [L, B, K, S, Dh]; valid: [B, S]).

  per_layer: k and v are tuples of L [B, K, S, Dh] arrays (`model.unstack_cache`).
  """
  if per_layer:
    kv = (("batch", "kv_heads", "length", "head_dim"),) * config.num_layers
  else:
    kv = ("layers", "batch", "kv_heads", "length", "head_dim")
  return KVCache(k=kv, v=kv, valid=("batch", "length"))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def logical_to_spec(
    axes: tuple, mesh: Mesh, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None
) -> PartitionSpec:
  """One array's logical axes -> PartitionSpec.

  A mesh axis is used at most once per array (the first dimension that asks for it wins),
  and with `shape` given, mesh axes are kept only while their product divides the dimension.
  """
  table = dict(rules)
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"logical axes {axes} have rank {len(axes)} but the shape is {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    kept = []
    for mesh_axis in (target,) if isinstance(target, str) else tuple(target):
      if mesh_axis in used or mesh_axis not in mesh.shape:
        continue
      size = math.prod(mesh.shape[a] for a in kept) * mesh.shape[mesh_axis]
      if shape is not None and shape[i] % size:
        continue
      kept.append(mesh_axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def logical_to_sharding(axes_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES, shapes=None):
  """Pytree of logical axes -> pytree of NamedSharding.

  `shapes`: optional pytree with the same structure whose leaves are arrays, ShapeDtypeStructs
  or shape tuples; with it, mappings the mesh does not divide are dropped.
  """
  if shapes is None:
    return jax.tree.map(
        lambda a: NamedSharding(mesh, logical_to_spec(a, mesh, rules)), axes_tree, is_leaf=_is_axes
    )
  shape_leaves = jax.tree.leaves(shapes, is_leaf=_is_shape)
  axes_leaves, treedef = jax.tree.flatten(axes_tree, is_leaf=_is_axes)
  if len(shape_leaves) != len(axes_leaves):
    raise ValueError(
        f"axes tree has {len(axes_leaves)} leaves but the shapes tree has {len(shape_leaves)}"
    )
  out = [
      NamedSharding(mesh, logical_to_spec(a, mesh, rules, getattr(s, "shape", s)))
      for a, s in zip(axes_leaves, shape_leaves)
  ]
  return jax.tree.unflatten(treedef, out)


def param_shardings(config: QwenConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
  """NamedSharding of every parameter of `config` on `mesh`."""
  return logical_to_sharding(param_logical_axes(config), mesh, rules, param_shapes(config))


def shard_params(params, config: QwenConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Places (or re-places) a params pytree on `mesh` following `rules`."""
  shardings = logical_to_sharding(param_logical_axes(config), mesh, rules, params)
  return jax.device_put(params, shardings)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1, meaning 'the rest'."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
          f"divisible by {known}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ValueError(
        f"mesh sizes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
        f"found {len(devices)}"
    )
  devices = devices[:math.prod(sizes)]  # a smaller mesh runs on the first devices
  try:
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(sizes)  # no topology info: plain order
  return Mesh(grid, MESH_AXES)


def fsdp_layout(config: QwenConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> FsdpLayout | None:
  """Each weight's stored spec on a training mesh and its spec with the batch's mesh axes
  dropped (gathered for use: `mar.models.fsdp`); None when no weight is split over them."""
  target = dict(rules).get("batch")
  targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  batch_axes = tuple(a for a in targets if mesh.shape.get(a, 1) > 1)
  axes, shapes = param_logical_axes(config), param_shapes(config)
  named = [(n, a, shapes["layers"][n], 1) for n, a in axes["layers"].items()]
  named += [(n, axes[n], shapes[n], 0) for n in ("embed", "lm_head") if n in axes]
  named.append(("value_head", ("embed",), (config.hidden_size,), 0))  # the PPO critic's
  weights = []
  for name, logical, shape, skip in named:
    stored = tuple(logical_to_spec(logical, mesh, rules, shape))[skip:]
    flat = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
    if not any(set(flat(e)) & set(batch_axes) for e in stored):
      continue
    gathered = []
    for e in stored:
      kept = tuple(a for a in flat(e) if a not in batch_axes)
      gathered.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    weights.append((name, PartitionSpec(*stored), PartitionSpec(*gathered)))
  return FsdpLayout(mesh, batch_axes, tuple(weights)) if weights else None


def with_fsdp(config: QwenConfig, mesh: Mesh | None, rules: Rules | None = None) -> QwenConfig:
  """The model config a learner on `mesh` trains with: FSDP weights gathered per layer."""
  if mesh is None:
    return config
  return config.replace(fsdp=fsdp_layout(config, mesh, DEFAULT_RULES if rules is None else rules))
