"""The training state on a device mesh: shardings of params, critic, optimizer state, batches.

`mar.models.sharding` says how one model's arrays split (logical axes -> mesh axes by a
rules table). This module applies that to everything a training step holds:

  mesh_from_config / rules_from_config   the mesh and rules a config asks for
  TrainShardings                         NamedShardings of policy, critic and optimizer states
  sharded_init                           an optimizer whose `init` places its state sharded
  constrain_batch / batch_constrained    rows over ('data', 'fsdp') inside a jit / a loss
  split_mini_batches                     mini-batches as local slices (no resharding programs)
  put_batch / host_local                 host rows -> global arrays -> this host's rows
  local_rows / is_main_process           which rows and files this host owns (multi-host)
  max_over_hosts / mean_over_hosts       host-side values agreed on / averaged over hosts
  reshard                                explicit, timed move between two layouts (and dtypes)
  sampling_mesh / sampling_shardings     the rollout's own layout (rows over data, tensor TP)
  per_device_bytes                       what one device holds

Everything runs unchanged on one device: a 1x1x1 mesh is a valid mesh.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mar import config_utils
from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig
from mar.models.init import param_shapes

Rules = sharding_lib.Rules
BATCH_AXIS = "batch"


# ----- mesh and rules from the config --------------------------------------------------------


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of `config.mesh` over all (or the given) devices."""
  m = config.mesh
  try:
    return sharding_lib.make_mesh(int(m.data), int(m.fsdp), int(m.tensor), devices=devices)
  except ValueError as e:
    raise config_utils.ConfigError(f"config.mesh (data={m.data}, fsdp={m.fsdp}, tensor={m.tensor}): {e}") from e


def rules_from_config(config) -> Rules:
  """`config.sharding_rules` as ((logical, mesh axes), ...) pairs; the defaults if unset.

  Each rule is [logical_name, mesh_axis | [mesh_axes...] | None]. Logical names the config
  does not mention keep their default mapping, so a config lists only what it changes.
  """
  given = config.get("sharding_rules") if hasattr(config, "get") else None
  if not given:
    return sharding_lib.DEFAULT_RULES
  table = dict(sharding_lib.DEFAULT_RULES)
  for i, rule in enumerate(given):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise config_utils.ConfigError(f"config.sharding_rules[{i}]: expected [logical_name, mesh_axes], "
                       f"found {rule!r}")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    for a in (axes,) if isinstance(axes, str) else axes or ():
      if a not in sharding_lib.MESH_AXES:
        raise config_utils.ConfigError(f"config.sharding_rules[{i}]: mesh axis {a!r} is not one of "
                         f"{sharding_lib.MESH_AXES}")
    table[name] = axes
  return tuple(table.items())


# ----- shardings of the training state ---------------------------------------------------------


def critic_logical_axes(config: QwenConfig) -> dict:
  """Logical axes of the PPO critic {'backbone': params, 'value_head': [D]}."""
  return {"backbone": sharding_lib.param_logical_axes(config), "value_head": ("embed",)}


def critic_shapes(config: QwenConfig) -> dict:
  return {"backbone": param_shapes(config), "value_head": (config.hidden_size,)}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _keys(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,)) for k in path)


def opt_state_shardings(optimizer: optax.GradientTransformation, params_like, param_sh, mesh):
  """NamedSharding of every leaf of `optimizer.init(params)`, without allocating it.

  A state leaf whose tree path ends with a parameter's path and has its shape (Adam's mu
  and nu, accumulators) shares that parameter's sharding; anything else (step counts,
  flags) is replicated.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(getattr(x, "shape", x), np.float32),
                        params_like, is_leaf=lambda x: isinstance(x, tuple) and all(
                            isinstance(d, int) for d in x))
  state = jax.eval_shape(optimizer.init, shapes)
  by_path = {}
  for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                               jax.tree_util.tree_flatten_with_path(param_sh)[0]):
    by_path[_keys(path)] = (tuple(p.shape), s)
  rep = replicated(mesh)

  def pick(path, leaf):
    keys = _keys(path)
    for n in range(len(keys), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, state)


@dataclasses.dataclass(frozen=True)
class TrainShardings:
  """Shardings of one run's arrays on one mesh (critic/optimizer entries None when absent)."""

  mesh: Mesh
  rules: Rules
  params: Any
  critic: Any = None
  actor_opt: Any = None
  critic_opt: Any = None

  @classmethod
  def create(cls, config: QwenConfig, mesh: Mesh, rules: Rules | None = None, *,
             actor_opt=None, critic_opt=None, with_critic: bool = False) -> "TrainShardings":
    rules = sharding_lib.DEFAULT_RULES if rules is None else rules
    shapes = param_shapes(config)
    params = sharding_lib.logical_to_sharding(sharding_lib.param_logical_axes(config), mesh,
                                              rules, shapes)
    critic = None
    if with_critic or critic_opt is not None:
      critic = sharding_lib.logical_to_sharding(critic_logical_axes(config), mesh, rules,
                                                critic_shapes(config))
    a_opt = None if actor_opt is None else opt_state_shardings(actor_opt, shapes, params, mesh)
    c_opt = None if critic_opt is None else opt_state_shardings(
        critic_opt, critic_shapes(config), critic, mesh)
    return cls(mesh, rules, params, critic, a_opt, c_opt)


def sharded_init(optimizer: optax.GradientTransformation, state_shardings):
  """`optimizer` whose `init` builds its state directly in `state_shardings` (one jit).

  Lets callers keep writing `opt.init(params)` while the moments land sharded like the
  params instead of on one device.
  """
  init = jax.jit(optimizer.init, out_shardings=state_shardings)
  return optax.GradientTransformation(init, optimizer.update)


def shard_tree(tree, shardings):
  """device_put of a pytree onto matching shardings (a no-op for arrays already there)."""
  return jax.device_put(tree, shardings)


# ----- batches ---------------------------------------------------------------------------------


def batch_spec(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> PartitionSpec:
  """Leading axis over the 'batch' rule's mesh axes (where they divide it), rest replicated."""
  if not shape:
    return PartitionSpec()
  axes = (BATCH_AXIS,) + (None,) * (len(shape) - 1)
  return sharding_lib.logical_to_spec(axes, mesh, rules, shape)


def batch_shards(mesh: Mesh | None, rules: Rules | None = None) -> int:
  """How many ways the rows of a batch are split (1 without a mesh)."""
  if mesh is None:
    return 1
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules
  n = 1 << 30  # a row count every shard count divides
  spec = batch_spec(mesh, rules, (n,))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def batch_shardings(tree, mesh: Mesh, rules: Rules | None = None):
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules
  return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(mesh, rules, np.shape(x))), tree)


def constrain_batch(tree, mesh: Mesh | None, rules: Rules | None = None):
  """Inside a jit: every leaf's leading axis is the batch (over data x fsdp)."""
  if mesh is None:
    return tree
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, batch_spec(mesh, rules, x.shape))), tree)


def split_mini_batches(tree, n: int, mesh: Mesh | None, rules: Rules | None = None):
  """Inside a jit: leaves [N, ...] -> [n, N / n, ...], rows of each part over data x fsdp.

  Mini-batch i is then `x[i]`, a slice along an unsharded axis that each device takes
  locally. Slicing rows of a row-sharded array eagerly instead runs a resharding program
  with collectives between the update programs; on XLA:CPU (the 8 simulated devices of
  the tests) such interleaved collective programs can deadlock.
  """
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules

  def split(x):
    x = x.reshape((n, x.shape[0] // n) + x.shape[1:])
    if mesh is None:
      return x
    spec = PartitionSpec(None, *batch_spec(mesh, rules, x.shape[1:]))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(split, tree)


def batch_constrained(loss_fn, mesh: Mesh | None, rules: Rules | None = None):
  """loss_fn(params, batch, *extra) whose batch is pinned to rows over data x fsdp.

  The constraint on the (micro-)batch is what makes the forward and backward passes data
  parallel: XLA propagates it to every activation. Identity without a mesh.
  """
  if mesh is None:
    return loss_fn

  def wrapped(params, batch, *extra):
    return loss_fn(params, constrain_batch(batch, mesh, rules), *extra)

  return wrapped


def put_batch(tree, mesh: Mesh | None, rules: Rules | None = None):
  """Host batch -> global arrays with rows over data x fsdp.

  One process: `tree` is the whole batch. Several processes (`jax.distributed`): each
  passes its own rows (see `local_rows`) and the global batch is their concatenation in
  process order. Arrays already sharded on `mesh` pass through.
  """
  if mesh is None:
    return tree
  rules = sharding_lib.DEFAULT_RULES if rules is None else rules
  procs = jax.process_count()

  def put(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
        x.sharding.mesh == mesh and not x.is_fully_addressable:
      return x  # already a global array
    if procs == 1:
      return jax.device_put(x, NamedSharding(mesh, batch_spec(mesh, rules, np.shape(x))))
    local = np.asarray(x)
    shape = (local.shape[0] * procs,) + local.shape[1:] if local.ndim else ()
    sh = NamedSharding(mesh, batch_spec(mesh, rules, shape))
    return jax.make_array_from_process_local_data(sh, local, shape)

  return jax.tree.map(put, tree)


def host_local(tree):
  """Global batch arrays -> numpy of the rows this process holds (the inverse of put_batch).

  One process: the whole array. Several: this host's rows, in order, replicas dropped;
  arrays replicated over the batch (scalars, P()) come back whole.
  """

  def local(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.ndim == 0:
      return np.asarray(x.addressable_shards[0].data)
    parts: dict[int, Any] = {}
    for shard in x.addressable_shards:
      parts.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])

  return jax.tree.map(local, tree)


# ----- multi-host bookkeeping -------------------------------------------------------------------


def is_main_process() -> bool:
  """Host 0 writes metrics, plots and configs; every host takes part in checkpoints."""
  return jax.process_index() == 0


def max_over_hosts(n: int) -> int:
  """The largest `n` any host passes (every host must call it: a collective)."""
  if jax.process_count() == 1:
    return int(n)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def sum_over_host_groups(values: np.ndarray, group: int) -> np.ndarray:
  """`values` summed over each run of `group` consecutive hosts (every host calls it)."""
  if jax.process_count() == 1 or group <= 1:
    return np.asarray(values)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  every = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float64)))
  first = jax.process_index() // group * group
  return every[first:first + group].sum(0)


def mean_over_hosts(metrics: dict) -> dict:
  """Numeric metrics averaged over hosts (each host's from its own rows); a collective.

  Hosts hold equal shares of the batch, so the mean of per-host means is the global mean;
  counts (e.g. none-pass groups) come out per host.
  """
  if jax.process_count() == 1:
    return metrics
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  keys = sorted(k for k, v in metrics.items() if np.ndim(v) == 0 and np.issubdtype(
      np.asarray(v).dtype, np.number))
  values = np.asarray([float(metrics[k]) for k in keys], np.float64)
  mean = multihost_utils.process_allgather(values).reshape(-1, len(keys)).mean(0)
  return {**metrics, **dict(zip(keys, mean.tolist()))}


def local_rows(global_rows: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
  """The rows of a global batch this host builds, tokenizes and verifies."""
  i = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if global_rows % n:
    raise ValueError(f"a global batch of {global_rows} rows does not split over {n} hosts")
  per = global_rows // n
  return slice(i * per, (i + 1) * per)


# ----- layouts: resharding and byte counts ------------------------------------------------------


def reshard(tree, shardings, dtype=None) -> tuple[Any, dict]:
  """Moves `tree` to `shardings` (floating leaves cast to `dtype` if given); what it cost.

  The sampler and the learner want different layouts of the same policy (replicated or
  tensor-parallel bf16 decode, FSDP f32 training). With `dtype` the cast runs where the
  arrays are, before they move, in one program (so an FSDP f32 policy moves as bf16).
  Returns (tree, {'seconds', 'bytes_moved'}), where bytes_moved counts the arrays whose
  sharding changed, at the bytes they move.
  """
  sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  moved = 0
  for x, s in zip(jax.tree.leaves(tree), sh_leaves):
    if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)):
      itemsize = np.dtype(_cast_dtype(x.dtype, dtype)).itemsize
      moved += x.size * itemsize
  start = time.perf_counter()
  if dtype is None:
    out = jax.device_put(tree, shardings)
  else:
    out = _cast_and_place(tree, shardings, dtype)
  out = jax.block_until_ready(out)
  return out, {"seconds": time.perf_counter() - start, "bytes_moved": float(moved)}


def _cast_dtype(have, want):
  if want is None or not np.issubdtype(have, np.floating):
    return have
  return want


_CAST_PROGRAMS: dict = {}


def _cast_and_place(tree, shardings, dtype):
  """One jitted program per (structure, dtype, layout): cast where the arrays are, then place."""
  leaves = tuple(jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)))
  key = (jax.tree.structure(tree), np.dtype(dtype).name, leaves)
  if key not in _CAST_PROGRAMS:
    _CAST_PROGRAMS[key] = jax.jit(
        lambda t: jax.tree.map(lambda x: x.astype(_cast_dtype(x.dtype, dtype)), t),
        out_shardings=shardings)
  return _CAST_PROGRAMS[key](tree)


# ----- the sampling layout ---------------------------------------------------------------------


def sampling_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The rollout's mesh, `config.rollout.mesh`: rows over 'data', weights over 'tensor'.

  Separate from the training mesh: no 'fsdp' (size 1), so decode never gathers weights.
  Default data = -1 (every device not used by 'tensor'), tensor = 1: fully data parallel.
  The devices are the training mesh's (`config.mesh`) unless given.
  """
  m = config.rollout.mesh
  if devices is None:
    devices = list(mesh_from_config(config).devices.flat)
  try:
    return sharding_lib.make_mesh(int(m.data), 1, int(m.tensor), devices=devices)
  except ValueError as e:
    raise config_utils.ConfigError(f"config.rollout.mesh (data={m.data}, tensor={m.tensor}): {e}") from e


def sampling_dtype(model_config: QwenConfig):
  """The weights' dtype while sampling: the compute dtype when it is narrower than f32."""
  d = jax.numpy.dtype(model_config.dtype)
  return d if d.itemsize < 4 else None


# The embedding and LM head stay whole on every device while sampling: each tensor shard then
# computes all the logits it samples from, with no gather per token.
SAMPLING_RULES = tuple((k, None if k == "vocab" else v) for k, v in sharding_lib.DEFAULT_RULES)


def sampling_shardings(model_config: QwenConfig, mesh: Mesh, rules: Rules | None = None):
  """Params on the sampling mesh: replicated over 'data', heads and MLP over 'tensor'."""
  rules = SAMPLING_RULES if rules is None else rules
  return sharding_lib.param_shardings(model_config, mesh, rules)


def per_device_bytes(tree, device=None) -> int:
  """Bytes of `tree` resident on one device (the first addressable one by default)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    dev = device if device is not None else next(iter(x.sharding.addressable_devices))
    for shard in x.addressable_shards:
      if shard.device == dev:
        total += math.prod(shard.data.shape) * x.dtype.itemsize
  return total


# ----- training state in host memory while the rollout runs (train.offload_state) ----------

HOST_MEMORY = "pinned_host"


def has_host_memory(devices: Sequence[Any] | None = None) -> bool:
  """Whether the devices can hold arrays in pinned host memory (JAX memory kinds)."""
  dev = (list(devices) if devices is not None else jax.devices())[0]
  try:
    return HOST_MEMORY in {m.kind for m in dev.addressable_memories()}
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return False


def _buffers(x) -> set:
  return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}


def to_host_memory(tree, keep=None):
  """Every array of `tree` moved to pinned host memory (same sharding, memory kind
  `pinned_host`); the device buffers are deleted, so the caller's old references are
  invalid (as after donation). Leaves sharing a buffer with `keep` (e.g. the sampling copy
  of the policy, when resharding it moved nothing) stay on the device untouched."""
  kept = set()
  for x in jax.tree.leaves(keep):
    if isinstance(x, jax.Array) and not x.is_deleted():
      kept |= _buffers(x)

  def move(x):
    if not isinstance(x, jax.Array) or x.sharding.memory_kind == HOST_MEMORY or (
        _buffers(x) & kept):
      return x
    return jax.device_put(x, x.sharding.with_memory_kind(HOST_MEMORY))

  out = jax.block_until_ready(jax.tree.map(move, tree))
  for old, new in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
    if new is not old:
      old.delete()
  return out


def to_device_memory(tree):
  """`to_host_memory`'s inverse: host-memory arrays back in device memory, same sharding."""
  def move(x):
    if not isinstance(x, jax.Array) or x.sharding.memory_kind != HOST_MEMORY:
      return x
    return jax.device_put(x, x.sharding.with_memory_kind("device"))

  out = jax.block_until_ready(jax.tree.map(move, tree))
  for old, new in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
    if new is not old:
      old.delete()
  return out
