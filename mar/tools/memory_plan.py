"""The memory model behind `python -m mar.tools.plan_memory`: per-device bytes of a run.

With `--compiled` (`compiled_report`) the rollout program (sampling layout) and the learner's
update programs (training layout) are compiled from shapes only (no weights; for simulated CPU devices, or
ahead of time for a TPU topology) and XLA's memory analysis, the KV bytes and the
collectives inside the decode loop are reported next to the planner's own figures for those
programs (`mar.tools.compiled_memory`).

Exact figures (from `jax.eval_shape` and the sharding rules on an abstract mesh of the
requested size, no devices needed): params, optimizer state, gradients, reference model,
critic and its optimizer, KV cache. Modelled from what XLA:TPU's buffer assignment holds at
the peak (`rollout_program_plan`, `update_program_plan`; checked against the v5p compiles in
bench/README.md): the rollout program (weights, their relayouted copies, the cache) and each
update program (its state, residuals, logits, one layer's backward). Without remat the
activations are a rougher estimate (`activation_bytes`). Params and their optimizer state
are f32 (mar keeps f32 master weights; `config.model.dtype` is the compute dtype).

Peak of the sampling phase = persistent training state + the rollout program's peak; peak
of the training phase = the state outside an update program + that program's peak, for the
larger program (PPO: actor or critic).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from mar import methods
from mar import parallel
from mar.models import model as qwen
from mar.models import sharding as sharding_lib
from mar.models.config import PRESETS, QwenConfig, dtype_from_name
from mar.models.init import param_shapes
from mar.rl import optim
from mar.rollout import shape as shape_lib

GiB = 2**30
FEEDBACK_LEN = shape_lib.FEEDBACK_LEN  # one multi-attempt feedback turn (METHODS.md §1)


# ----- meshes without devices -----------------------------------------------------------------


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """config.mesh sizes with the -1 axis filled in for `num_devices` devices."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  where = f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})"
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{where}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{where}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"{where} needs {math.prod(sizes)} devices, --devices={num_devices}")
  return dict(zip(sharding_lib.MESH_AXES, sizes))


def resolve_sampling_shape(config, num_devices: int) -> dict[str, int]:
  """config.rollout.mesh sizes (the sampling layout: no 'fsdp') for `num_devices` devices."""
  m = config.rollout.mesh
  tensor = int(m.tensor)
  data = int(m.data) if int(m.data) != -1 else num_devices // max(tensor, 1)
  if tensor < 1 or data < 1 or data * tensor != num_devices:
    raise ValueError(f"config.rollout.mesh (data={m.data}, tensor={m.tensor}) does not fit "
                     f"{num_devices} devices")
  return {"data": data, "fsdp": 1, "tensor": tensor}


def abstract_mesh(shape: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(shape[a] for a in sharding_lib.MESH_AXES), sharding_lib.MESH_AXES)


def sharded_bytes(shapes, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under a matching sharding tree."""
  total = 0
  for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    total += math.prod(sh.shard_shape(s.shape)) * np.dtype(s.dtype).itemsize
  return total


def _structs(shapes: dict, dtype) -> dict:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def param_bytes(model: QwenConfig, mesh, rules=sharding_lib.DEFAULT_RULES,
                dtype=jnp.float32) -> int:
  """Per-device bytes of the policy params (exact)."""
  sh = parallel.TrainShardings.create(model, mesh, rules)
  return sharded_bytes(_structs(param_shapes(model), dtype), sh.params)


def opt_state_bytes(model: QwenConfig, optimizer, mesh, rules=sharding_lib.DEFAULT_RULES,
                    dtype=jnp.float32, critic: bool = False) -> int:
  """Per-device bytes of `optimizer.init(params)` (or of the critic's), exact."""
  shapes = parallel.critic_shapes(model) if critic else param_shapes(model)
  sh = parallel.TrainShardings.create(model, mesh, rules, with_critic=critic)
  target = sh.critic if critic else sh.params
  structs = _structs(shapes, dtype)
  state = jax.eval_shape(optimizer.init, structs)
  return sharded_bytes(state, parallel.opt_state_shardings(optimizer, shapes, target, mesh))


def critic_bytes(model: QwenConfig, mesh, rules=sharding_lib.DEFAULT_RULES,
                 dtype=jnp.float32) -> int:
  sh = parallel.TrainShardings.create(model, mesh, rules, with_critic=True)
  return sharded_bytes(_structs(parallel.critic_shapes(model), dtype), sh.critic)


def kv_cache_bytes(model: QwenConfig, mesh, rows: int, slots: int,
                   rules=sharding_lib.DEFAULT_RULES, dtype=jnp.bfloat16) -> int:
  """Per-device bytes of the rollout's KV cache as `models.model.init_cache` makes it (k, v,
  the validity mask and, for a long cache, its window), exact."""
  cache = jax.eval_shape(lambda: qwen.init_cache(model, rows, slots, dtype))
  shapes = {n: s for n, s in cache._asdict().items() if s is not None}
  axes = sharding_lib.cache_logical_axes(model)
  axes = {**axes._asdict(), "k_win": axes.k, "v_win": axes.v}
  sh = {n: NamedSharding(mesh, sharding_lib.logical_to_spec(axes[n], mesh, rules,
                                                            shapes[n].shape)) for n in shapes}
  return sharded_bytes(shapes, sh)


# ----- activation estimates ---------------------------------------------------------------------


def _split(size: int, mesh, rules, logical: str) -> int:
  """How many ways a dimension of `size` with this logical name is split on `mesh`."""
  spec = sharding_lib.logical_to_spec((logical,), mesh, rules, (size,))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def activation_bytes(model: QwenConfig, mesh, rows: int, seq: int, remat: bool,
                     rules=sharding_lib.DEFAULT_RULES, dtype=jnp.bfloat16,
                     logprob_chunk: int = 512) -> int:
  """Estimated per-device activation memory of one micro-batch's forward + backward.

  Per token and layer the backward keeps (counted in elements): the residual stream and
  norm inputs/outputs with their f32 statistics (~6 D), q/k/v before and after the q/k norm
  and RoPE (2 (H + 2K) Dh + 2 (H + K) Dh), the attention output and its projection input
  (2 H Dh), gate, up, SiLU and their product (4 F); plus the dense attention scores (f32),
  probabilities and their gradient (f32) over all key slots, as this model has no flash
  attention, so those grow as seq^2. With remat only each layer's input is kept and one
  layer's internals are rebuilt at a time. Add the f32 logits of one scoring chunk (logits,
  softmax, gradient). bench/train_step.py ("planner_check") compares activations + the
  gradients row with XLA's compiled memory analysis of the update step on CPU: 0.94-1.5x
  of XLA's figure (tiny and medium models), i.e. mostly on the safe side.
  """
  b = np.dtype(dtype).itemsize
  m = model
  local_rows = math.ceil(rows / _split(rows, mesh, rules, "batch"))
  tp_heads = _split(m.num_kv_heads, mesh, rules, "kv_heads")
  tp_mlp = _split(m.intermediate_size, mesh, rules, "mlp")
  tp_vocab = _split(m.vocab_size, mesh, rules, "vocab")
  heads, kv = m.num_heads / tp_heads, m.num_kv_heads / tp_heads
  f = m.intermediate_size / tp_mlp
  d, dh = m.hidden_size, m.head_dim
  linear = 6 * d + 2 * (heads + 2 * kv) * dh + 2 * (heads + kv) * dh + 2 * heads * dh + 4 * f
  tokens = local_rows * seq
  one_layer = tokens * linear * b + local_rows * heads * seq * seq * (4 + b + 4)
  if remat:
    body = m.num_layers * tokens * d * b + one_layer
  else:
    body = m.num_layers * one_layer
  logits = local_rows * min(logprob_chunk, seq) * (m.vocab_size / tp_vocab) * 4 * 3
  return int(body + logits)


# ----- the plan ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  name: str
  bytes: int
  note: str = ""


@dataclasses.dataclass
class Plan:
  title: str
  mesh: dict[str, int]
  rows: list[Row]
  peaks: dict[str, int]
  device_bytes: int
  remat: bool
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def fits(self) -> bool:
    key = "training, remat on" if self.remat else "training, remat off"
    return max(self.peaks["sampling"], self.peaks[key]) <= self.device_bytes

  def as_dict(self) -> dict:
    return {"title": self.title, "mesh": self.mesh, "device_gib": self.device_bytes / GiB,
            "remat": self.remat, "fits": self.fits, "warnings": self.warnings,
            "rows": {r.name: r.bytes / GiB for r in self.rows},
            "peaks_gib": {k: v / GiB for k, v in self.peaks.items()}}


def _kl(config) -> bool:
  return bool(config.ppo.kl_coef if methods.of(config).is_ppo else config.grpo.kl_coef)


def resident_state(by: dict[str, int]) -> int:
  """Bytes the run keeps on a device between programs (a plan's rows by name)."""
  return sum(by.get(k, 0) for k in ("params (f32)", "optimizer state", "reference model",
                                    "critic", "critic optimizer state"))


def program_state(by: dict[str, int], program: str) -> int:
  """The part of `resident_state` an update program takes as its own arguments."""
  if program == "update_critic":
    return by["critic"] + by["critic optimizer state"]
  return by["params (f32)"] + by["optimizer state"]


def plan(config, model: QwenConfig, num_devices: int, device_memory_gib: float,
         feedback_len: int = FEEDBACK_LEN, title: str = "") -> Plan:
  """Per-device bytes of every part of a run of `config` on `num_devices` devices."""
  shape = resolve_mesh_shape(config.mesh, num_devices)
  mesh = abstract_mesh(shape)
  rules = parallel.rules_from_config(config)
  compute = dtype_from_name(config.model.dtype)
  r, ppo_run = config.rollout, methods.of(config).is_ppo
  lr = methods.of(config).policy_lr(config)
  opt = optim.make_optimizer(lr, max(config.train.num_steps, 1))
  rs = shape_lib.rollout_shape(config, feedback_len)
  slots, rollout_rows = rs.cache_len, rs.rows
  if ppo_run:
    per_update, mb, micro = r.prompts_per_step, config.ppo.mini_batches, config.ppo.micro_batches
    seq = slots
  else:
    per_update = r.prompts_per_step * config.grpo.group_size
    mb, micro, seq = config.grpo.mini_batches, config.grpo.micro_batches, slots
  micro_rows = max(per_update // mb // micro, 1)

  p = param_bytes(model, mesh, rules)
  rows = [Row("params (f32)", p, "policy master weights"),
          Row("optimizer state", opt_state_bytes(model, opt, mesh, rules), "Adam mu, nu (f32)"),
          Row("gradients", 2 * p, "f32 accumulator + one micro-batch's gradient")]
  rows.append(Row("reference model", p if _kl(config) else 0,
                  "frozen copy of the policy" if _kl(config) else "none: kl_coef = 0"))
  if ppo_run:
    rows.append(Row("critic", critic_bytes(model, mesh, rules), "backbone + value head (f32)"))
    rows.append(Row("critic optimizer state", opt_state_bytes(model, opt, mesh, rules,
                                                              critic=True), "Adam (f32)"))
    rows.append(Row("critic gradients", 2 * critic_bytes(model, mesh, rules), "f32"))
  cast = param_bytes(model, mesh, rules, compute) if compute != jnp.float32 else 0
  rows.append(Row("weights in compute dtype", cast,
                  f"{np.dtype(compute).name} copy XLA may hoist out of the decode loop" if cast
                  else "none: the compute dtype is float32"))
  rows.append(Row("KV cache (rollout)", kv_cache_bytes(model, mesh, rollout_rows, slots, rules,
                                                       compute),
                  f"{rollout_rows} rows x {slots} slots, {np.dtype(compute).name}"))
  programs = {on: update_program_plan(config, model, shape, remat=on) for on in (True, False)}
  act = {on: max(u["residual_bytes_per_device"] + max(
      u["logits_bytes_per_device"], u["layer_backward_bytes_per_device"])
                 for u in programs[on].values()) for on in (True, False)}
  local = math.ceil(micro_rows / _split(micro_rows, mesh, rules, "batch"))
  note = (f"micro-batch {micro_rows} rows ({local} per device) x {seq} tokens: layer inputs + "
          "the larger of the logits and one layer's backward (update_activation_bytes)")
  warnings = []
  batch_ways = _split(2**30, mesh, rules, "batch")  # what the batch rule could split
  for what, n in (("rollout batch", rollout_rows), ("training micro-batch", micro_rows)):
    if n % batch_ways:
      warnings.append(f"{what} of {n} rows does not split over the {batch_ways} batch shards "
                      f"(data x fsdp): every device computes more rows than it needs to")
  rows.append(Row("activations, remat on", act[True], note))
  rows.append(Row("activations, remat off", act[False],
                  "estimate: every layer's internals kept (activation_bytes)"))

  by = {row.name: row.bytes for row in rows}
  persistent = resident_state(by)

  def training_peak(on: bool) -> int:
    return max(persistent - program_state(by, name) + u["peak_bytes_per_device"]
               for name, u in programs[on].items())

  sampling_shape = resolve_sampling_shape(config, num_devices)
  rollout = rollout_program_plan(config, model, sampling_shape)
  peaks = {
      "sampling": persistent + rollout["peak_bytes_per_device"],
      "training, remat on": training_peak(True),
      "training, remat off": training_peak(False),
  }
  return Plan(title, shape, rows, peaks, int(device_memory_gib * GiB), bool(config.model.remat),
              warnings)


def format_plan(pl: Plan) -> str:
  """Markdown table of a plan (GiB per device)."""
  mesh = " x ".join(f"{k}={v}" for k, v in pl.mesh.items())
  lines = [f"{pl.title}  mesh {mesh} ({math.prod(pl.mesh.values())} devices)", "",
           "| per device | GiB | note |", "|---|---:|---|"]
  for r in pl.rows:
    lines.append(f"| {r.name} | {r.bytes / GiB:.2f} | {r.note} |")
  for k, v in pl.peaks.items():
    lines.append(f"| **peak, {k}** | **{v / GiB:.2f}** | |")
  gib = pl.device_bytes / GiB
  verdict = "fits" if pl.fits else "does NOT fit"
  lines += ["", f"{verdict} in {gib:g} GiB per device (remat {'on' if pl.remat else 'off'}, "
                "as configured)"]
  lines += [f"warning: {w}" for w in pl.warnings]
  return "\n".join(lines)


def model_config(config, preset: str | None) -> QwenConfig:
  """The architecture: a preset by name, else config.model.path's config.json."""
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"--model={preset!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[preset]()
  path = config.model.path
  if path and os.path.isfile(os.path.join(path, "config.json")):
    return QwenConfig.from_hf_dir(path)
  if config.model.get("demo") and config.model.demo.get("enabled"):
    from mar import demo  # pylint: disable=g-import-not-at-top

    return demo.demo_model_config(config.model.demo.vocab_size)
  raise ValueError(f"config.model.path={path!r} has no config.json; pass --model=PRESET "
                   f"(one of {sorted(PRESETS)})")


# ----- the planner's figures for the rollout program, and XLA's ----------------------------------


# Weights the rollout program keeps a second, relayouted copy of for its whole length.
# XLA:TPU's buffer assignment for the v5p compiles (bench/README.md) holds every layer's fused
# qkv ([D, K, R + 2, Dh]) and gate_up ([D, 2, F]) twice: as passed in, and in the layout its
# matmuls read (D minor for qkv; gate and up apart). The other weights are read in place.
RELAYOUTED_WEIGHTS = ("qkv", "gate_up")


def relayout_bytes(model: QwenConfig, mesh, rules, dtype) -> int:
  """Per-device bytes of the second copy of `RELAYOUTED_WEIGHTS` (sampling layout)."""
  shapes = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in param_shapes(model)["layers"].items()
            if k in RELAYOUTED_WEIGHTS}
  axes = sharding_lib.param_logical_axes(model)["layers"]
  sh = {k: NamedSharding(mesh, sharding_lib.logical_to_spec(axes[k], mesh, rules, v.shape))
        for k, v in shapes.items()}
  return sharded_bytes(shapes, sh)


def rollout_program_plan(config, model: QwenConfig, sampling_shape: dict[str, int]) -> dict:
  """The planner's per-device bytes of the rollout program on the sampling layout.

  For the whole program: the weights in the sampling dtype (replicated over 'data'; heads
  and MLP split over 'tensor'), the relayouted copy of the fused qkv and gate_up weights
  (`RELAYOUTED_WEIGHTS`), the episodes' per-slot buffers of the local queue (tokens, valid,
  log-probs and their masked copy, masks, attempt id) and a few [rows, V] f32 logit buffers
  of the sampler. On top, one phase: the full cache lives throughout and each prompt is
  prefilled alone beside it (one row's prompt cache and activations: the residual stream
  and the larger of one layer's attention -- dense f32 scores over the prompt, q/k/v -- and
  its MLP -- gate, up and their product).
  """
  from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top

  mesh = abstract_mesh(sampling_shape)
  rules = parallel.SAMPLING_RULES
  dtype = dtype_from_name(config.model.dtype)
  b = np.dtype(dtype).itemsize
  rs = cm.rollout_shape(config)
  weights = param_bytes(model, mesh, rules, dtype)
  relayout = relayout_bytes(model, mesh, rules, dtype)
  kv = kv_cache_bytes(model, mesh, rs.rows, rs.slots, rules, dtype)
  kv_prompt = kv_cache_bytes(model, mesh, rs.rows, rs.prompt_len, rules, dtype)
  local = math.ceil(rs.rows / _split(rs.rows, mesh, rules, "batch"))
  tp_heads = _split(model.num_kv_heads, mesh, rules, "kv_heads")
  tp_mlp = _split(model.intermediate_size, mesh, rules, "mlp")
  heads, kv_heads = model.num_heads / tp_heads, model.num_kv_heads / tp_heads
  p, dh, d = rs.prompt_len, model.head_dim, model.hidden_size
  attention = heads * p * 4 + 2 * (heads + 2 * kv_heads) * dh * b  # per prompt token
  mlp = 3 * model.intermediate_size / tp_mlp * b
  # One row's prompt cache and prefill activations.
  kv_prompt //= local
  prefill_act = int(p * (2 * d * b + max(attention, mlp)))
  episodes = math.ceil(rs.queue / _split(rs.queue, mesh, rules, "batch")) * rs.slots * 19
  logits = 4 * local * model.vocab_size * 4
  phases = {"decode": kv + kv_prompt + prefill_act}
  return {"weights_bytes_per_device": weights, "relayout_bytes_per_device": relayout,
          "kv_bytes_per_device": kv, "kv_prompt_bytes_per_device": kv_prompt,
          "prefill_activation_bytes_per_device": prefill_act,
          "episode_buffers_bytes_per_device": episodes, "logits_bytes_per_device": logits,
          "peak_phase": max(phases, key=phases.get),
          "peak_bytes_per_device": (weights + relayout + episodes + logits
                                    + max(phases.values())),
          "rows": rs.rows, "slots": rs.slots}


def _mesh_axes(mesh, rules, logical: str, size: int = 2**30) -> tuple[str, ...]:
  spec = sharding_lib.logical_to_spec((logical,), mesh, rules, (size,))[0]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def _gathered_rows(rows: int, mesh, rules) -> int:
  """Rows of a micro-batch one device computes the big matmuls of.

  The learners gather each layer's FSDP-split weights (`mar.models.fsdp`), so a device
  computes its own rows only. (Before, XLA's SPMD partitioner all-gathered the activations of
  every 'fsdp' shard's rows and all-reduced each projection's output instead.)
  """
  return math.ceil(rows / _split(rows, mesh, rules, "batch"))


def gathered_weight_bytes(model: QwenConfig, mesh, rules, dtype, names=None) -> int:
  """Per-device bytes of weights gathered over the batch's mesh axes (FSDP), still split over
  'tensor': one layer's (`names` None) or the named top-level params ('embed', 'lm_head')."""
  gathered = {a: (1 if a in _mesh_axes(mesh, rules, "batch") else n)
              for a, n in mesh.shape.items()}
  all_shapes, all_axes = param_shapes(model), sharding_lib.param_logical_axes(model)
  if names is None:  # one layer: the stacked layers' shapes without their leading axis
    shapes = {k: v[1:] for k, v in all_shapes["layers"].items()}
    axes = {k: v[1:] for k, v in all_axes["layers"].items()}
  else:
    shapes = {k: all_shapes[k] for k in names}
    axes = {k: all_axes[k] for k in names}
  am = abstract_mesh(gathered)
  structs = {k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()}
  sh = {k: NamedSharding(am, sharding_lib.logical_to_spec(axes[k], am, rules, v))
        for k, v in shapes.items()}
  return sharded_bytes(structs, sh)


def update_activation_bytes(model: QwenConfig, mesh, rows: int, seq: int, remat: bool,
                            rules=sharding_lib.DEFAULT_RULES, dtype=jnp.bfloat16,
                            logprob_chunk: int = 512, logits: bool = True) -> dict:
  """Per-device bytes one micro-batch adds during the update, by phase (XLA:TPU's program).

  residuals  with remat: each layer's input kept for the backward, [rows, S, D] per layer
             (without remat: `activation_bytes`, all of every layer's internals)
  logits     (policy programs) the f32 logits of every scoring chunk of the local rows,
             kept for the backward, plus one chunk's logits for the gathered rows
             (`_gathered_rows`) while they are all-reduced
  layer      the backward of one rematerialised layer: dense f32 attention scores, their
             compute-dtype probabilities and the boolean mask ([group x S, S] per KV head
             group) over S x S for the local rows; for the gathered rows the layer's input,
             its q/k/v, the MLP's gate/up output and their product
  Measured against the v5p compiles' buffer assignments (bench/README.md).
  """
  b = np.dtype(dtype).itemsize
  m = model
  local = math.ceil(rows / _split(rows, mesh, rules, "batch"))
  gathered = _gathered_rows(rows, mesh, rules)
  heads = m.num_heads / _split(m.num_kv_heads, mesh, rules, "kv_heads")
  f = m.intermediate_size / _split(m.intermediate_size, mesh, rules, "mlp")
  vocab = m.vocab_size / _split(m.vocab_size, mesh, rules, "vocab")
  if remat:
    residuals = m.num_layers * local * seq * m.hidden_size * b
    group = m.num_heads // m.num_kv_heads
    kv_heads = m.num_kv_heads / _split(m.num_kv_heads, mesh, rules, "kv_heads")
    layer = (local * seq * seq * (heads * (4 + b) + group)  # scores, probabilities, mask
             + gathered * seq * b * (m.hidden_size + (heads + 2 * kv_heads) * m.head_dim
                                     + 3 * f))  # input, q/k/v, gate/up, their product
  else:
    residuals = activation_bytes(m, mesh, rows, seq, False, rules, dtype, logprob_chunk)
    layer = 0
  chunk = min(logprob_chunk, seq)
  padded = -(-seq // chunk) * chunk
  saved_logits = (local * padded + gathered * chunk) * vocab * 4 if logits else 0
  return {"residuals": int(residuals), "logits": int(saved_logits), "layer": int(layer)}


# Bytes per learner slot of the mini-batch fields each update program reads (`compiled_memory`'s
# ppo_batch / group_batch; jit drops the fields a program does not read from its arguments).
_SLOT_BYTES = {
    "update_actor": {"tokens": 4, "segment_ids": 4, "action_mask": 1, "old_logp": 4,
                     "ref_logp": 4, "advantages": 4},
    "update_critic": {"tokens": 4, "segment_ids": 4, "action_mask": 1, "old_values": 4,
                      "returns": 4},
    "update": {"tokens": 4, "segment_ids": 4, "action_mask": 1, "old_logp_hinted": 4,
               "sampler_logp": 4, "hinted": 1, "advantages": 4},
}


def update_program_plan(config, model: QwenConfig, train_shape: dict[str, int],
                        remat: bool | None = None) -> dict:
  """The planner's per-device bytes of each update program on the training layout.

  For the whole program: its arguments (the f32 params being trained, their optimizer
  state, one mini-batch of `compiled_memory.update_shape`: every sequence in its own row),
  the f32 gradient accumulator, the weights cast to the compute dtype (the cast is hoisted
  out of the layer scan) and the embedding (and an untied LM head) gathered whole. On top,
  the larger of the logits phase (policy programs: the scoring chunks' logits and the head's
  whole gradient) and the backward's layer phase, which also holds one micro-batch's f32
  gradients (`update_activation_bytes`).
  """
  from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top

  mesh = abstract_mesh(train_shape)
  rules = parallel.rules_from_config(config)
  us = cm.update_shape(config, _split(2**30, mesh, rules, "batch"))
  cfg = cm.program_model(config, model)
  remat = cfg.remat if remat is None else remat
  compute = dtype_from_name(config.model.dtype)
  ppo_run = methods.of(config).is_ppo
  lr = methods.of(config).policy_lr(config)
  opt = optim.make_optimizer(lr, max(config.train.num_steps, 1))
  local_rows = math.ceil(us.rows / _split(us.rows, mesh, rules, "batch"))
  programs = {"update_actor": False, "update_critic": True} if ppo_run else {"update": False}
  out = {}
  for name, critic in programs.items():
    slot = dict(_SLOT_BYTES[name])
    if not ppo_run and us.mini_batches > 1:
      slot["old_logp"] = 4
    if name == "update_actor" and config.ppo.tis_cap:
      slot["sampler_logp"] = 4  # TIS weights: the PPO actor reads it only then
    if not ppo_run and config.grpo.kl_coef:
      slot["ref_logp"] = 4
    if not ppo_run and us.packed and config.grpo.agg == "seq_mean_token_mean":
      slot["seq_counts"] = 4  # only this aggregation reads the per-slot sequence lengths
    per_row = {"loss_norm": 4} if not ppo_run and us.packed else {}
    if not us.packed:  # a validity mask instead of segment ids, per-sequence fields per row
      slot["valid"] = slot.pop("segment_ids") // 4
      if not ppo_run:
        per_row = {k: slot.pop(k) for k in ("hinted", "advantages")}
    batch = local_rows * (us.row_len * sum(slot.values()) + sum(per_row.values()))
    params = critic_bytes(cfg, mesh, rules) if critic else param_bytes(cfg, mesh, rules)
    state = opt_state_bytes(cfg, opt, mesh, rules, critic=critic)
    cast = params * np.dtype(compute).itemsize // 4
    act = update_activation_bytes(cfg, mesh, us.micro_rows, us.row_len, remat, rules, compute,
                                  logits=not critic)
    # The backward's layer also holds that layer's gathered weights and their full
    # (not yet reduced) gradient, in the compute dtype.
    gathered = 2 * gathered_weight_bytes(cfg, mesh, rules, compute) if us.micro_rows else 0
    # The embedding (and an untied LM head) gathered in the compute dtype, hoisted out of
    # the loops; a policy's scoring-chunk backward adds the head's whole f32 gradient and
    # its compute-dtype all-reduce (the v5p compiles' buffer assignments, bench/README.md).
    head = "embed" if cfg.tie_word_embeddings else "lm_head"
    tops = ("embed",) if critic or cfg.tie_word_embeddings else ("embed", "lm_head")
    top = gathered_weight_bytes(cfg, mesh, rules, compute, tops)
    head_grad = 0 if critic else sum(
        gathered_weight_bytes(cfg, mesh, rules, d, (head,)) for d in (jnp.float32, compute))
    logits = act["logits"] + head_grad
    phases = {"logits": logits, "backward": params + act["layer"] + gathered}
    whole = params + state + batch + params + cast + top + act["residuals"]
    out[name] = {"params_bytes_per_device": params, "optimizer_state_bytes_per_device": state,
                 "batch_bytes_per_device": batch, "gradient_accumulator_bytes_per_device": params,
                 "micro_batch_gradient_bytes_per_device": params,
                 "compute_dtype_weights_bytes_per_device": cast,
                 "residual_bytes_per_device": act["residuals"],
                 "gathered_embedding_bytes_per_device": top,
                 "logits_bytes_per_device": logits,
                 "layer_backward_bytes_per_device": act["layer"],
                 "peak_phase": max(phases, key=phases.get),
                 "peak_bytes_per_device": whole + max(phases.values()),
                 "rows": us.rows, "row_len": us.row_len, "micro_rows": us.micro_rows,
                 "remat": remat}
  return out


def compiled_report(config, model: QwenConfig, num_devices: int | None, topology: str | None,
                    dump_hlo: str | None = None, with_update: bool = True) -> dict:
  """Compiles the rollout program (on the sampling layout) and the learner's update
  program(s) (on the training layout) and reports XLA's figures next to the planner's."""
  from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top

  if topology:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    devices = list(topologies.get_topology_desc(topology, "tpu").devices)
  else:
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = parallel.sampling_mesh(config, devices=devices)
  cr = cm.compile_rollout(config, model, mesh)
  loop = cm.decode_loop_collectives(cr.hlo, model.num_layers)
  train_mesh = parallel.mesh_from_config(config, devices=devices)
  updates = cm.compile_updates(config, model, train_mesh) if with_update else []
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    for name, hlo in [("rollout", cr.hlo)] + [(u.name, u.hlo) for u in updates]:
      with open(os.path.join(dump_hlo, f"{name}.txt"), "w") as f:
        f.write(hlo)
  on_cpu = devices[0].platform == "cpu"
  m = cr.memory
  peak = _peak(m, on_cpu)
  planned = rollout_program_plan(config, model, dict(mesh.shape))
  kv_loop = cm.loop_kv_bytes(loop["carried"], model, cr.shape.slots)
  report = {
      "target": topology or f"{len(devices)} x {devices[0].platform}",
      "sampling_mesh": dict(mesh.shape),
      "rollout": {
          "rows": cr.shape.rows, "slots": cr.shape.slots,
          "arguments_bytes_per_device": m["argument_size_in_bytes"],
          "outputs_bytes_per_device": m["output_size_in_bytes"],
          "temporaries_bytes_per_device": m["temp_size_in_bytes"],
          "xla_peak_memory_in_bytes": m["peak_memory_in_bytes"],
          "peak_bytes_per_device": peak,
          "kv_bytes_per_device": kv_loop,
          "kv_bytes_per_device_expected": cr.kv_bytes_per_device,
          "kv_bytes_all_rows": cr.kv_bytes_all_rows,
          "decode_loop_found": loop["found"],
          "decode_loop_collectives": loop["count"],
          "decode_loop_collective_bytes": loop["bytes"],
          "decode_loop_collective_ops": loop["ops"],
          "decode_loop_collective_dtypes": loop["dtypes"],
          "compile_s": round(cr.compile_s, 1),
      },
      "plan": planned,
      "plan_over_compiled": {
          "kv": planned["kv_bytes_per_device"] / max(kv_loop, 1),
          "peak": planned["peak_bytes_per_device"] / max(peak, 1),
      },
  }
  if updates:
    report["training_mesh"] = dict(train_mesh.shape)
    report["update"] = {u.name: _update_entry(u, on_cpu) for u in updates}
    for u in updates:
      report["update"][u.name]["collectives"] = cm.program_collectives(
          u.hlo, cm.weight_sizes(model), model.num_layers)
    planned_updates = update_program_plan(config, model, dict(train_mesh.shape))
    report["plan"]["update"] = planned_updates
    for u in updates:
      report["plan_over_compiled"][u.name] = (
          planned_updates[u.name]["peak_bytes_per_device"]
          / max(report["update"][u.name]["peak_bytes_per_device"], 1))
  return report


def _peak(m: dict, on_cpu: bool) -> int:
  """TPU/GPU compilers report the peak of their buffer assignment; XLA:CPU's figure is not
  one (it tracks the arguments), so there the sum of all buffers stands in."""
  if on_cpu:
    return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
            - m["alias_size_in_bytes"])
  return m["peak_memory_in_bytes"]


def _update_entry(u, on_cpu: bool) -> dict:
  m, us = u.memory, u.shape
  return {"rows": us.rows, "row_len": us.row_len, "micro_rows": us.micro_rows,
          "micro_batches": us.micro_batches, "packed": us.packed,
          "arguments_bytes_per_device": m["argument_size_in_bytes"],
          "outputs_bytes_per_device": m["output_size_in_bytes"],
          "temporaries_bytes_per_device": m["temp_size_in_bytes"],
          "alias_bytes_per_device": m["alias_size_in_bytes"],
          "xla_peak_memory_in_bytes": m["peak_memory_in_bytes"],
          "peak_bytes_per_device": _peak(m, on_cpu), "compile_s": round(u.compile_s, 1)}


def training_plan_over_compiled(pl: Plan, report: dict) -> dict:
  """The plan's phase peaks over the same phases built from the compiled programs (the
  resident state beside each program, from the plan's exact rows, plus XLA's peak)."""
  by = {r.name: r.bytes for r in pl.rows}
  resident = resident_state(by)
  out = {"sampling_phase": pl.peaks["sampling"] / (
      resident + report["rollout"]["peak_bytes_per_device"])}
  if "update" in report:
    compiled = max(resident - program_state(by, name) + u["peak_bytes_per_device"]
                   for name, u in report["update"].items())
    key = "training, remat on" if pl.remat else "training, remat off"
    out["training_phase"] = pl.peaks[key] / compiled
  return out
