"""Sizes that fit a device, confirmed by XLA, and a roofline of the step (plan_memory --fit).

`fit_report` picks the rollout rows (`rollout.batch_size`) and the update's micro-batches
(`ppo.micro_batches` / `grpo.micro_batches`) that fit the budget per device
(`--hbm_gib`, else `mesh.hbm_fraction` x the chip's memory): the analytic planner
(`plan_memory`) ranks the candidates, then each program is compiled at the chosen size
(`compiled_memory`) and the size steps down while XLA's figure does not fit. A program's
figure is the bytes on a device while it runs: XLA's peak plus the training state that stays
resident beside it (f32 params, Adam moments, reference model, critic). A config's own
sizes are upper bounds (-1: the whole step). Nothing fits: `NoFit` names the program and
its bytes.

The roofline costs each program from the model's shapes on the chip's published peak bf16
FLOP/s and HBM bandwidth (`CHIPS`): the rollout's decode loop per trip at the expected live
length, scoring and the updates on the step's real tokens. XLA's cost analysis (flops, bytes
accessed) is reported beside it; it counts a while loop's body once, so it is not a step's
cost.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np

from mar import methods
from mar import parallel
from mar import setup
from mar.models.config import QwenConfig, dtype_from_name
from mar.rollout import shape as shape_lib
from mar.tools import compiled_memory as cm
from mar.tools import memory_plan as pm

GiB = 2**30
MAX_COMPILES_PER_PROGRAM = 3


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  bf16_flops: float  # peak dense bf16 FLOP/s per chip
  hbm_bw: float  # bytes/s per chip


# Published per-chip figures (cloud.google.com/tpu/docs/<version>).
CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9),
    "v5e": Chip(16 * GiB, 197e12, 819e9),
    "v5p": Chip(95 * GiB, 459e12, 2765e9),
    "v6e": Chip(32 * GiB, 918e12, 1640e9),
}


def _gib(nbytes: int) -> str:
  return f"{nbytes / GiB:.2f} GiB ({int(nbytes):,} bytes)"


class NoFit(Exception):
  """Nothing fits: the message names the program and its bytes; `report` holds what was
  compiled before (programs, details)."""

  def __init__(self, message: str, report: dict | None = None):
    super().__init__(message)
    self.report = report or {}


class _CompileOOM(Exception):
  def __init__(self, nbytes: int, message: str):
    super().__init__(message)
    self.nbytes = nbytes


_OOM = re.compile(r"RESOURCE_EXHAUSTED: (.*?required for [\w ]+ \(([\d.]+)([KMGT])\).*?)(?:\n|$)")


def _compile(fn, *args):
  """fn(*args), with XLA:TPU's "ran out of memory" compile error as `_CompileOOM` (bytes)."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    m = _OOM.search(str(e))
    if not m:
      raise
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(3)]
    raise _CompileOOM(int(float(m.group(2)) * unit), m.group(1)) from e


def chip_for(topology: str | None) -> Chip | None:
  if not topology:
    return None
  name = topology.split(":")[0]
  if name not in CHIPS:
    raise ValueError(f"--topology={topology}: no published figures for {name!r} "
                     f"(known: {sorted(CHIPS)}); pass --hbm_gib")
  return CHIPS[name]


def cores_per_chip(devices) -> int:
  """Devices per chip: libtpu's v4 topologies list each TensorCore as a device (2 per chip,
  no megacore), so a device has half the chip's memory and peak."""
  coords = {tuple(getattr(d, "coords", ())) or d.id for d in devices}
  return max(len(devices) // len(coords), 1)


def _with(config, **updates):
  c = copy.deepcopy(config)
  for key, value in updates.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _micro_key(config) -> str:
  return f"{methods.of(config).hparams_key}.micro_batches"


def _micro_value(config) -> int:
  return int(methods.of(config).hparams(config).micro_batches)


row_candidates = shape_lib.row_candidates
micro_candidates = shape_lib.micro_candidates


def _state(config, model, train_shape) -> tuple[int, dict]:
  """Resident training state per device, and the plan's rows by name."""
  pl = pm.plan(config, model, math.prod(train_shape.values()), 1.0)
  by = {r.name: r.bytes for r in pl.rows}
  return pm.resident_state(by), by


def _planned_rollout(config, model, sampling_shape) -> int:
  return pm.rollout_program_plan(config, model, sampling_shape)["peak_bytes_per_device"]


def _planned_updates(config, model, train_shape, resident, by) -> dict:
  return {name: resident - pm.program_state(by, name) + u["peak_bytes_per_device"]
          for name, u in pm.update_program_plan(config, model, train_shape).items()}


def offloaded_bytes(by: dict) -> int:
  """What train.offload_state moves to host memory during the rollout, per device: the f32
  params and optimizer moments of the actor and the critic (a plan's rows by name)."""
  return sum(by.get(k, 0) for k in ("params (f32)", "optimizer state", "critic",
                                    "critic optimizer state"))


def fit_report(config, model: QwenConfig, devices, topology: str | None,
               hbm_gib: float | None, log=print) -> dict:
  """The fitted sizes, every program's compiled bytes per device and the roofline."""
  chip = chip_for(topology)
  cores = cores_per_chip(devices)
  if hbm_gib:
    budget = int(hbm_gib * GiB)
  elif chip is not None:
    budget = int(float(config.mesh.get("hbm_fraction", 0.9)) * chip.hbm_bytes / cores)
  else:
    raise ValueError("--fit needs --hbm_gib (no chip memory is known for simulated devices)")
  # -1 sizes (and the config's own) are the upper bounds the search starts from.
  config = _with(config, **{"rollout.batch_size": row_candidates(config, 1)[0]
                            if int(config.rollout.batch_size) < 0 else
                            int(config.rollout.batch_size)})
  config = _with(config, **{_micro_key(config): micro_candidates(config)[0]})
  train_mesh = parallel.mesh_from_config(config, devices=devices)
  sample_mesh = parallel.sampling_mesh(config, devices=devices)
  train_shape, sampling_shape = dict(train_mesh.shape), dict(sample_mesh.shape)
  resident, by = _state(config, model, train_shape)
  on_cpu = devices[0].platform == "cpu"
  programs, details, overrides = {}, {}, {}

  def refuse(program: str, nbytes: int, how: str):
    partial = {}
    if chip is not None and _micro_key(config) in overrides:  # sized; scoring refused
      partial["roofline_at_fitted_sizes"] = roofline(
          _with(config, **overrides), model, chip, len(devices) // cores,
          sampling_shape["data"], cores)
    raise NoFit(f"{program} needs {_gib(nbytes)} per device ({how}), over the budget of "
                f"{_gib(budget)} per device: nothing fits on {topology or 'these devices'}",
                {"hbm_bytes_per_device": budget, "overrides": overrides,
                 "programs": programs, "details": details,
                 "resident_state_bytes_per_device": resident, **partial})

  # The update programs: their state alone must fit (exact figures; no size changes them).
  for name in ("update_actor", "update_critic") if methods.of(config).is_ppo else ("update",):
    # + the f32 gradient accumulator of the model it trains
    floor = resident + (by["critic"] if name == "update_critic" else by["params (f32)"])
    if floor > budget:
      refuse(name, floor, "exact: resident f32 params and Adam moments plus the f32 gradient "
             "accumulator, before any activation; not compiled")

  # Rollout rows, and whether the training state waits in host memory meanwhile
  # (train.offload_state: "auto" turns it on only where the rows chosen do not fit without).
  rows_key = "rollout.batch_size"
  offload = setup.offload_value(config)
  parked = offloaded_bytes(by) if offload is not False else 0
  beside = {False: resident, True: resident - parked}  # state beside the rollout, by offload
  cands = row_candidates(config, sampling_shape["data"])
  planned = {r: _planned_rollout(_with(config, **{rows_key: r}), model, sampling_shape)
             for r in cands}
  chosen, tries, scale, last = None, 0, 1.0, None
  while tries < MAX_COMPILES_PER_PROGRAM:
    # The largest candidate the planner, corrected by the last compile's ratio, says fits.
    fitting = [r for r in cands if (planned[r] + beside[True]) * scale <= budget]
    r = fitting[0] if fitting else min(cands)
    if r == last:
      break
    last = r
    c = _with(config, **{rows_key: r})
    log(f"compiling the rollout at {r} rows (planned "
        f"{(planned[r] + beside[True]) / GiB:.2f} GiB per device)")
    tries += 1
    try:
      cr = _compile(cm.compile_rollout, c, model, sample_mesh)
    except _CompileOOM as e:
      programs["rollout"] = beside[True] + e.nbytes
      details["rollout"] = {"rows": r, "planned": planned[r] + beside[True],
                            "xla_error": str(e)}
      scale = max(scale, e.nbytes / planned[r])
      continue
    peak = pm._peak(cr.memory, on_cpu)  # pylint: disable=protected-access
    # Offload where the state must leave ("true"), or only where it does not fit beside.
    park = offload is True or (offload == "auto" and peak + resident > budget)
    total = peak + beside[park]
    details["rollout"] = _detail(cr.memory, cr.compile_s, on_cpu, cr, rows=r,
                                 planned=planned[r] + beside[park], offload_state=park,
                                 state_beside_bytes_per_device=beside[park])
    programs["rollout"] = total
    if total <= budget:
      chosen = r
      break
    scale = max(scale, peak / planned[r])
  if chosen is None:
    refuse("rollout", programs["rollout"], f"at {r} rows: XLA's peak plus the training "
           f"state beside it, {_gib(beside[True])}"
           + (" with train.offload_state" if parked else ""))
  overrides[rows_key] = chosen
  if offload == "auto" and details["rollout"]["offload_state"]:
    overrides["train.offload_state"] = True
  config = _with(config, **{rows_key: chosen})

  # Update micro-batches.
  mkey = _micro_key(config)
  cands = micro_candidates(config)
  plans = {m: _planned_updates(_with(config, **{mkey: m}), model, train_shape, resident, by)
           for m in cands}
  chosen, tries, scale, last = None, 0, 1.0, None
  while tries < MAX_COMPILES_PER_PROGRAM:
    fitting = [m for m in cands if max(plans[m].values()) * scale <= budget]
    m = fitting[0] if fitting else cands[-1]
    if m == last:
      break
    last = m
    c = _with(config, **{mkey: m})
    log(f"compiling the update(s) at {m} micro-batches (planned "
        f"{max(plans[m].values()) / GiB:.2f} GiB per device)")
    tries += 1
    try:
      updates = _compile(cm.compile_updates, c, model, train_mesh)
    except _CompileOOM as e:
      worst = max(plans[m], key=plans[m].get)  # XLA does not say which; the planner's larger
      programs[worst] = resident + e.nbytes
      details[worst] = {"micro_batches": m, "planned": plans[m][worst], "xla_error": str(e)}
      scale = max(scale, programs[worst] / plans[m][worst])
      continue
    worst = None
    for u in updates:
      total = resident - pm.program_state(by, u.name) + pm._peak(u.memory, on_cpu)  # pylint: disable=protected-access
      programs[u.name] = total
      details[u.name] = _detail(
          u.memory, u.compile_s, on_cpu, u, micro_batches=m, micro_rows=u.shape.micro_rows,
          planned=plans[m][u.name],
          collectives=cm.program_collectives(u.hlo, cm.weight_sizes(model), model.num_layers))
      if total > budget and (worst is None or total > programs[worst]):
        worst = u.name
    if worst is None:
      chosen = m
      break
    scale = max(scale, max(programs[n] / plans[m][n] for n in plans[m]))
  if chosen is None:
    refuse(worst, programs[worst], f"at {m} micro-batches: XLA's peak plus the resident "
           "state beside it")
  overrides[mkey] = chosen
  config = _with(config, **{mkey: chosen})

  # Scoring: one program over the whole step, its forwards in chunks of the update's
  # micro-batch rows (so sized by the micro-batches just chosen).
  log("compiling the scoring program")
  try:
    cs = _compile(cm.compile_scoring, config, model, train_mesh)
  except _CompileOOM as e:
    programs["scoring"] = resident + e.nbytes
    details["scoring"] = {"xla_error": str(e)}
    refuse("scoring", programs["scoring"], "one program over the whole step's batch; XLA:TPU "
           f"refused to compile it: {e}; plus the resident training state")
  # Its arguments (policy, PPO's critic and reference) are resident state XLA's peak holds.
  scoring_args = by["params (f32)"] + (by.get("critic", 0) + by.get("reference model", 0)
                                       if methods.of(config).is_ppo else 0)
  programs["scoring"] = resident - scoring_args + pm._peak(cs.memory, on_cpu)  # pylint: disable=protected-access
  details["scoring"] = _detail(cs.memory, cs.compile_s, on_cpu, cs)
  if programs["scoring"] > budget:
    refuse("scoring", programs["scoring"], "one program over the whole step's batch: XLA's "
           "peak plus the resident training state")
  out = {"hbm_bytes_per_device": budget, "overrides": overrides, "programs": programs,
         "target": topology or f"{len(devices)} x {devices[0].platform}",
         "training_mesh": train_shape, "sampling_mesh": sampling_shape,
         "resident_state_bytes_per_device": resident, "details": details,
         "flags": " ".join(f"--config.{k}={v}" for k, v in overrides.items())}
  if chip is not None:
    out["roofline"] = roofline(config, model, chip, len(devices) // cores,
                               sampling_shape["data"], cores)
    out["devices_per_chip"] = cores
  return out


def _detail(memory: dict, seconds: float, on_cpu: bool, compiled_obj, **extra) -> dict:
  cost = getattr(compiled_obj, "cost", None) or {}
  return {"xla_peak_bytes_per_device": pm._peak(memory, on_cpu),  # pylint: disable=protected-access
          "arguments_bytes_per_device": memory["argument_size_in_bytes"],
          "xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed"),
          "compile_s": round(seconds, 1), **extra}


# ----- roofline ----------------------------------------------------------------------------


def _matmul_params(model: QwenConfig) -> tuple[int, int]:
  """Weights multiplied per token: decoder layers, and the LM head."""
  d, f, l = model.hidden_size, model.intermediate_size, model.num_layers
  q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
  return l * (d * (q + 2 * kv) + q * d + 3 * d * f), d * model.vocab_size


def roofline(config, model: QwenConfig, chip: Chip, chips: int, data_shards: int,
             cores: int = 1) -> dict:
  """Seconds of one training step on `chips` chips, each program at max(FLOPs / peak,
  bytes / bandwidth), and the step's tokens per second per chip.

  Assumed lengths: prompts fill half their bucket, responses half the token budget (all
  attempts together). Rollout: decode trips = episodes x mean response / rows (refills keep
  rows busy), each reading the bf16 weights and the rows' KV at the mean live length (prompt
  + half the response) and computing 2 x weights + attention FLOPs per row; prefill at the
  mean prompt. Scoring: a forward of every real token (PPO: policy, critic, and the reference
  with a KL term; GRPO: the policy when pi_old is a separate pass). Updates: forward +
  backward (+ the rematerialised forward) over every real token per epoch, each micro-batch
  reading the gathered compute-dtype weights 3 times, the optimizer reading and writing f32
  params, gradients and both moments.
  """
  r, ppo = config.rollout, methods.of(config).is_ppo
  s = shape_lib.rollout_shape(config)
  prompt, response = r.prompt_len / 2, r.token_budget / 2
  seq = prompt + response
  layers_w, head_w = _matmul_params(model)
  weights = layers_w + head_w
  b = np.dtype(dtype_from_name(config.model.dtype)).itemsize
  attn_per_ctx = 4 * model.num_layers * model.num_heads * model.head_dim  # qk + pv, per key
  kv_per_slot = 2 * model.num_layers * model.num_kv_heads * model.head_dim * b

  def t(flops, nbytes, share=1):  # on one chip, or on one of its `share` devices
    return max(flops * share / chip.bf16_flops, nbytes * share / chip.hbm_bw)

  local_rows = s.rows / data_shards
  live = prompt + response / 2
  trips = s.episodes * response / s.rows
  trip = t(local_rows * (2 * weights + attn_per_ctx * live),
           weights * b + local_rows * live * kv_per_slot, cores)
  prefill = t(s.episodes / data_shards * prompt * (2 * weights + attn_per_ctx * prompt / 2),
              weights * b, cores)
  rollout_s = trips * trip + prefill
  tokens = s.episodes * seq  # real tokens of the step
  fwd = tokens / chips * (2 * weights + attn_per_ctx * seq / 2)
  kl = config.ppo.kl_coef if ppo else config.grpo.kl_coef
  mini = config.ppo.mini_batches if ppo else config.grpo.mini_batches
  passes = (2 + bool(kl)) if ppo else (int(mini > 1) + bool(kl))
  scoring_s = t(passes * fwd, passes * weights * b)
  remat = 4 if config.model.remat else 3  # forward, backward (2x), rematerialised forward
  micro = max(_micro_value(config), 1)
  models_trained = 2 if ppo else 1
  update_s = models_trained * t(
      remat * fwd, mini * (micro * 3 * weights * b + 4 * 4 * 2 * weights / chips))
  step_s = rollout_s + scoring_s + update_s
  return {"step_s": step_s, "tokens_per_s_per_chip": tokens / step_s / chips,
          "programs_s": {"rollout": rollout_s, "scoring": scoring_s, "updates": update_s},
          "tokens_per_step": tokens, "decode_trips": trips,
          "assumptions": {"mean_prompt_tokens": prompt, "mean_response_tokens": response,
                          "chip_bf16_flops": chip.bf16_flops, "chip_hbm_bytes_per_s": chip.hbm_bw}}
