"""Per-device memory of a run before launching it: does this config fit this mesh?

  python -m mar.tools.plan_memory --config=configs/lte_qwen.py --model=qwen3_8b_base \\
      --devices=8 --config.mesh.fsdp=8 --config.mesh.data=1 --device_memory_gib=80
  python -m mar.tools.plan_memory --config=configs/multi_attempt_qwen.py \\
      --model=qwen2_5_math_1_5b --compiled --devices=8 --json   # or --topology=v5p:2x2x2

With --compiled the rollout program itself is compiled from shapes only (no weights; for
simulated CPU devices, or ahead of time for a TPU topology) and XLA's memory analysis, the
KV bytes and the collectives inside the decode loop are reported next to the planner's own
figures for that program (`mar.tools.compiled_memory`).

Exact figures (from `jax.eval_shape` and the sharding rules on an abstract mesh of the
requested size, no devices needed): params, optimizer state, gradients, reference model,
critic and its optimizer, KV cache. Estimates (formulas below): training activations with
and without remat, and the f32 logits of one scoring chunk. Params and their optimizer
state are f32 (mar keeps f32 master weights; `config.model.dtype` is the compute dtype).

Peak of the sampling phase = persistent state + KV cache + weights cast to the compute
dtype; peak of the training phase = persistent state + gradients + activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding
from ml_collections import config_flags

from mar import parallel
from mar.models import sharding as sharding_lib
from mar.models.config import PRESETS, QwenConfig, dtype_from_name
from mar.models.init import param_shapes
from mar.rl import optim

GiB = 2**30
FEEDBACK_LEN = 24  # tokens of one multi-attempt feedback turn (METHODS.md §1), rounded up


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
  """Per-device bytes of the rollout's KV cache (k, v and the validity mask), exact."""
  kv = (model.num_layers, rows, model.num_kv_heads, slots, model.head_dim)
  shapes = {"k": jax.ShapeDtypeStruct(kv, dtype), "v": jax.ShapeDtypeStruct(kv, dtype),
            "valid": jax.ShapeDtypeStruct((rows, slots), jnp.bool_)}
  axes = sharding_lib.cache_logical_axes(model)
  sh = {n: NamedSharding(mesh, sharding_lib.logical_to_spec(getattr(axes, n), mesh, rules,
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
  return bool(config.ppo.kl_coef if config.method == "ppo" else config.grpo.kl_coef)


def plan(config, model: QwenConfig, num_devices: int, device_memory_gib: float,
         feedback_len: int = FEEDBACK_LEN, title: str = "") -> Plan:
  """Per-device bytes of every part of a run of `config` on `num_devices` devices."""
  shape = resolve_mesh_shape(config.mesh, num_devices)
  mesh = abstract_mesh(shape)
  rules = parallel.rules_from_config(config)
  compute = dtype_from_name(config.model.dtype)
  r, ppo_run = config.rollout, config.method == "ppo"
  lr = config.ppo.actor_lr if ppo_run else config.grpo.lr
  opt = optim.make_optimizer(lr, max(config.train.num_steps, 1))
  attempts = r.max_attempts if ppo_run else 1
  slots = r.prompt_len + r.token_budget + (attempts - 1) * feedback_len
  rollout_rows = r.batch_size or r.prompts_per_step
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
  act = {on: activation_bytes(model, mesh, micro_rows, seq, on, rules, compute)
         for on in (True, False)}
  local = math.ceil(micro_rows / _split(micro_rows, mesh, rules, "batch"))
  note = f"estimate: micro-batch {micro_rows} rows ({local} per device) x {seq} tokens"
  warnings = []
  batch_ways = _split(2**30, mesh, rules, "batch")  # what the batch rule could split
  for what, n in (("rollout batch", rollout_rows), ("training micro-batch", micro_rows)):
    if n % batch_ways:
      warnings.append(f"{what} of {n} rows does not split over the {batch_ways} batch shards "
                      f"(data x fsdp): every device computes more rows than it needs to")
  rows.append(Row("activations, remat on", act[True], note))
  rows.append(Row("activations, remat off", act[False], note))

  by = {row.name: row.bytes for row in rows}
  persistent = sum(by[k] for k in ("params (f32)", "optimizer state", "reference model"))
  if ppo_run:
    persistent += by["critic"] + by["critic optimizer state"]
  grads = max(by["gradients"], by.get("critic gradients", 0))  # actor and critic steps alternate
  peaks = {
      "sampling": persistent + by["KV cache (rollout)"] + cast,
      "training, remat on": persistent + grads + act[True],
      "training, remat off": persistent + grads + act[False],
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


# ----- command line -------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_MODEL = flags.DEFINE_string("model", None, f"Preset instead of config.model.path: {sorted(PRESETS)}")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices in the mesh (default: jax.device_count()).")
_MEMORY = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device, GiB.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_COMPILED = flags.DEFINE_bool(
    "compiled", False, "Also compile the rollout program (no weights) and report XLA's own "
    "per-device figures: memory analysis, KV bytes, collectives in the decode loop.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compiled: compile for this TPU topology ahead of time (e.g. "
    "v5p:2x2x2; needs libtpu, jax[tpu]) instead of --devices simulated CPU devices.")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "With --compiled: write the optimized HLO "
                                "of each program here (rollout.txt).")


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


def rollout_program_plan(config, model: QwenConfig, sampling_shape: dict[str, int]) -> dict:
  """The planner's per-device bytes of the rollout program on the sampling layout.

  Arguments: the weights in the sampling dtype (replicated over 'data'; heads and MLP split
  over 'tensor'). The program then peaks either in prefill (the prompt-length cache plus one
  layer's activations over the prompt: dense f32 scores and their probabilities, q/k/v, the
  MLP's gate, up and product) or in decode (the full cache, plus the prompt-length cache it
  was padded from), on top of the episodes' per-slot buffers (tokens, log-probs, masks,
  attempt ids) and a few [rows, V] f32 logit buffers of the sampler.
  """
  from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top

  mesh = abstract_mesh(sampling_shape)
  rules = parallel.SAMPLING_RULES
  dtype = dtype_from_name(config.model.dtype)
  b = np.dtype(dtype).itemsize
  rs = cm.rollout_shape(config)
  weights = param_bytes(model, mesh, rules, dtype)
  kv = kv_cache_bytes(model, mesh, rs.rows, rs.slots, rules, dtype)
  kv_prompt = kv_cache_bytes(model, mesh, rs.rows, rs.prompt_len, rules, dtype)
  local = math.ceil(rs.rows / _split(rs.rows, mesh, rules, "batch"))
  tp_heads = _split(model.num_kv_heads, mesh, rules, "kv_heads")
  tp_mlp = _split(model.intermediate_size, mesh, rules, "mlp")
  heads, kv_heads = model.num_heads / tp_heads, model.num_kv_heads / tp_heads
  p, dh, d = rs.prompt_len, model.head_dim, model.hidden_size
  per_token = (heads * p * (4 + b)  # scores (f32) and probabilities
               + 2 * (heads + 2 * kv_heads) * dh * b  # q/k/v before and after RoPE
               + 3 * model.intermediate_size / tp_mlp * b + 4 * d * b)
  prefill_act = int(local * p * per_token)
  per_slot = 4 + 4 + 1 + 1 + 4 + 4  # tokens, log-probs, action / feedback masks, attempt id, copy
  episodes = local * rs.slots * per_slot
  logits = 4 * local * model.vocab_size * 4
  phases = {"prefill": kv_prompt + prefill_act, "decode": kv + kv_prompt}
  return {"weights_bytes_per_device": weights, "kv_bytes_per_device": kv,
          "kv_prompt_bytes_per_device": kv_prompt,
          "prefill_activation_bytes_per_device": prefill_act,
          "episode_buffers_bytes_per_device": episodes, "logits_bytes_per_device": logits,
          "peak_phase": max(phases, key=phases.get),
          "peak_bytes_per_device": weights + episodes + logits + max(phases.values()),
          "rows": rs.rows, "slots": rs.slots}


def compiled_report(config, model: QwenConfig, num_devices: int | None, topology: str | None,
                    dump_hlo: str | None = None) -> dict:
  """Compiles the rollout program and reports XLA's figures next to the planner's."""
  from mar.tools import compiled_memory as cm  # pylint: disable=g-import-not-at-top

  if topology:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    devices = list(topologies.get_topology_desc(topology, "tpu").devices)
  else:
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = parallel.sampling_mesh(config, devices=devices)
  cr = cm.compile_rollout(config, model, mesh)
  loop = cm.decode_loop_collectives(cr.hlo, model.num_layers)
  if dump_hlo:
    os.makedirs(dump_hlo, exist_ok=True)
    with open(os.path.join(dump_hlo, "rollout.txt"), "w") as f:
      f.write(cr.hlo)
  m = cr.memory
  summed = (m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
            - m["alias_size_in_bytes"])
  # TPU/GPU compilers report the peak of their buffer assignment; XLA:CPU's figure is not
  # one (it tracks the arguments), so there the sum of all buffers stands in.
  on_cpu = devices[0].platform == "cpu"
  peak = summed if on_cpu else m["peak_memory_in_bytes"]
  planned = rollout_program_plan(config, model, dict(mesh.shape))
  kv_loop = cm.loop_kv_bytes(loop["carried"], model, cr.shape.slots)
  return {
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
      },
      "plan": planned,
      "plan_over_compiled": {
          "kv": planned["kv_bytes_per_device"] / max(kv_loop, 1),
          "peak": planned["peak_bytes_per_device"] / max(peak, 1),
      },
  }


def _use_simulated_devices(n: int | None) -> None:
  """Asks XLA:CPU for n devices (before the backend starts; a no-op once it has)."""
  if n:
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  model = model_config(config, _MODEL.value)
  if _COMPILED.value and not _TOPOLOGY.value:
    _use_simulated_devices(_DEVICES.value)
  devices = _DEVICES.value or jax.device_count()
  if _TOPOLOGY.value:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    devices = len(topologies.get_topology_desc(_TOPOLOGY.value, "tpu").devices)
  name = _MODEL.value or config.model.path or "demo model"
  title = f"{flags.FLAGS['config'].config_filename} ({config.method}), {name}"
  pl = plan(config, model, devices, _MEMORY.value, title=title)
  if not _COMPILED.value:
    print(json.dumps(pl.as_dict(), indent=1) if _JSON.value else format_plan(pl))
    return
  report = compiled_report(config, model, _DEVICES.value, _TOPOLOGY.value, _DUMP_HLO.value)
  report["plan"]["training_plan"] = pl.as_dict()
  if _JSON.value:
    print(json.dumps(report, indent=1))
    return
  print(format_plan(pl))
  r, p = report["rollout"], report["plan"]
  print(f"\ncompiled rollout on {report['target']}, sampling mesh {report['sampling_mesh']}:")
  for k in ("arguments_bytes_per_device", "temporaries_bytes_per_device",
            "peak_bytes_per_device", "kv_bytes_per_device"):
    print(f"  {k}: {r[k] / GiB:.2f} GiB")
  print(f"  planned peak {p['peak_bytes_per_device'] / GiB:.2f} GiB, KV "
        f"{p['kv_bytes_per_device'] / GiB:.2f} GiB")
  print(f"  decode loop: {r['decode_loop_collectives']} collectives, "
        f"{r['decode_loop_collective_bytes']} bytes per token step {r['decode_loop_collective_ops']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
