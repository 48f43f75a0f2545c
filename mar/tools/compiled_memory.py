"""What XLA itself says a config's rollout and update programs need: compiled with no weights.

`compile_rollout` lowers the trainer's rollout program for a config (the engine's queue
program, `mar.rollout.continuous.rollout`) on the sampling layout (`parallel.sampling_mesh`: rows over 'data', weights in the sampling dtype
over 'tensor') from `jax.ShapeDtypeStruct`s only, and reads XLA's memory analysis of the
compiled program. `decode_loop_collectives` parses its optimized HLO: the decode loop is the
innermost while loop whose body (with everything it calls) runs the whole model; the
collectives there run once per token step. `compile_updates` does the same for the
learner's jitted update step(s) (PPO actor and critic, GRPO / LTE policy) on the training
layout (`config.mesh`), with one mini-batch of `update_shape`.

Used by `python -m mar.tools.plan_memory --compiled`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mar import methods
from mar import episodes as episodes_lib
from mar import parallel
from mar.models import model as qwen
from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig, dtype_from_name
from mar.models.init import init_params, param_shapes
from mar.rl import packing
from mar.rollout import continuous
from mar.rollout import spec as spec_lib
from mar.rollout import runner as runner_lib
from mar.rollout import shape as shape_lib
from mar.sampling import SamplingParams
from mar.sampling.stop import boxed_stop_predicate

FEEDBACK_LEN = shape_lib.FEEDBACK_LEN  # one multi-attempt feedback turn, rounded up
STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "all-reduce-start", "all-gather-start", "collective-permute-start",
               "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


# ----- the rollout program's shapes ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutShape:
  """Static sizes of a config's rollout program (the largest prompt bucket)."""

  rows: int
  prompt_len: int
  attempts: int
  spec: spec_lib.RolloutSpec
  queue: int  # episodes of one step, padded to a multiple of rows (the continuous engine's Q)

  @property
  def slots(self) -> int:
    return self.spec.cache_len


def rollout_shape(config) -> RolloutShape:
  """`mar.rollout.shape.rollout_shape` with the sampler's spec (Qwen's stop ids)."""
  r, s = config.rollout, shape_lib.rollout_shape(config)
  spec = spec_lib.RolloutSpec(
      max_attempts=s.attempts, token_budget=r.token_budget, cache_len=s.cache_len,
      sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
      stop_ids=STOP_IDS, check_every=r.check_every, hint_feedback_len=r.hint_feedback_len)
  return RolloutShape(s.rows, s.prompt_len, s.attempts, spec, s.queue)


def program_model(config, model: QwenConfig) -> QwenConfig:
  """The model config both programs run: compute dtype and remat from `config.model`."""
  return model.replace(dtype=dtype_from_name(config.model.dtype), remat=config.model.remat)


class _NoVerifier:
  """The engine's verifier interface, for compiling only (never called)."""

  @staticmethod
  def verify_rows(example_ids, tokens, start, end, live, turn):
    del example_ids, tokens, start, end, turn
    return np.zeros_like(live), np.zeros_like(live)

  @staticmethod
  def hint_feedback_rows(seqs, attempts_left, go_on, width):
    return np.zeros((len(seqs), width), np.int32), np.zeros(len(seqs), np.int32)


def _token_strings(vocab: int) -> list[str]:
  """A stand-in vocabulary for the boxed-stop tables (their sizes follow the vocab)."""
  special = {0: "\\boxed{", 1: "}", 2: "{"}
  return [special.get(i, "a") for i in range(vocab)]


# ----- compile ---------------------------------------------------------------------------------


@dataclasses.dataclass
class CompiledRollout:
  shape: RolloutShape
  mesh: dict
  memory: dict  # XLA's memory analysis, bytes per device
  kv_bytes_per_device: int
  kv_bytes_all_rows: int
  hlo: str
  compile_s: float = 0.0
  cost: dict | None = None  # XLA's cost analysis (a while loop's body counted once)


def cost_figures(compiled) -> dict:
  """flops and bytes accessed from XLA's cost analysis of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}


def compile_rollout(config, model: QwenConfig, mesh: Mesh) -> CompiledRollout:
  """Lowers and compiles the rollout program of `config` on `mesh` (the sampling layout)."""
  model = program_model(config, model)
  rs = rollout_shape(config)
  dtype = parallel.sampling_dtype(model) or jnp.float32
  p_sh = parallel.sampling_shardings(model, mesh)
  p_shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  params = unstacked_structs(
      jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                   p_shapes, p_sh))
  pred = boxed_stop_predicate(_token_strings(model.vocab_size))
  callbacks = rs.attempts > 1 or bool(rs.spec.hint_feedback_len)
  fn, args = _engine_program(config, model, rs, mesh, pred, callbacks)
  start = time.perf_counter()
  compiled = fn.lower(params, *args).compile()
  seconds = time.perf_counter() - start
  memory = memory_figures(compiled)
  kv_all = kv_bytes(model, rs.rows, rs.slots, dtype)
  data = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  shards = data if rs.rows % data == 0 else 1
  tp = mesh.shape["tensor"] if model.num_kv_heads % mesh.shape["tensor"] == 0 else 1
  return CompiledRollout(rs, dict(mesh.shape), memory, kv_all // shards // tp, kv_all,
                         compiled.as_text(), seconds, cost_figures(compiled))


def _engine_program(config, model, rs: RolloutShape, mesh, pred, callbacks: bool):
  """The engine's program (as `RolloutRunner._engine_for` builds it) and its args: the
  queue of the step's Q episodes, the feedback table and the key."""
  r = config.rollout
  espec = continuous.EngineSpec(
      rs.spec, rows=rs.rows, refill_rows=r.refill_rows, refill_wait=r.refill_wait,
      verify_every=r.verify_every, prompt_widths=runner_lib.prompt_buckets(rs.prompt_len)[:-1])
  queue_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                     (rs.queue,)))
  queue2_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                      (rs.queue, rs.prompt_len)))
  args = (jax.ShapeDtypeStruct((rs.queue, rs.prompt_len), jnp.int32, sharding=queue2_sh),
          jax.ShapeDtypeStruct((rs.queue, rs.prompt_len), jnp.bool_, sharding=queue2_sh),
          jax.ShapeDtypeStruct((rs.queue,), jnp.int32, sharding=queue_sh),
          # Unplaced, as the runner passes them (numpy): the engine closes over them inside
          # its shard_map, where a value placed on the (automatic) mesh may not be indexed.
          jax.ShapeDtypeStruct((rs.attempts, FEEDBACK_LEN), jnp.int32),
          jax.ShapeDtypeStruct((rs.attempts,), jnp.int32),
          jax.ShapeDtypeStruct((2,), jnp.uint32))
  verify = _NoVerifier() if callbacks else None
  stop = pred if r.stop_at_box else None
  fn = jax.jit(lambda params, *a: continuous.rollout(model, params, espec, stop, verify, *a,
                                                     mesh=mesh))
  return fn, args


def unstacked_structs(params: dict) -> dict:
  """Stacked param structs -> the per-layer layout the runner samples with (same shardings)."""
  layers = params["layers"]
  n = jax.tree.leaves(layers)[0].shape[0]

  def layer(x):
    sh = NamedSharding(x.sharding.mesh, PartitionSpec(*tuple(x.sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)

  return {**params, "layers": tuple(jax.tree.map(layer, layers) for _ in range(n))}


def kv_bytes(model: QwenConfig, rows: int, slots: int, dtype) -> int:
  """All rows' cache as `models.model.init_cache` makes it: k and v of every layer, a long
  cache's window, the validity mask."""
  cache = jax.eval_shape(lambda: qwen.init_cache(model, rows, slots, dtype))
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


# ----- the learner's update programs ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpdateShape:
  """One mini-batch of the learner's update at its largest: every sequence fills its own row."""

  sequences: int  # per optimizer step (the whole rollout batch)
  seq_len: int  # slots of one sequence as the rollout hands it over
  row_len: int  # slots of a learner row (packed: train.pack_len; else seq_len)
  mini_batches: int
  rows: int  # rows of one mini-batch
  micro_rows: int  # rows of one micro-batch
  packed: bool

  @property
  def micro_batches(self) -> int:
    return self.rows // self.micro_rows


def update_shape(config, shards: int) -> UpdateShape:
  """The largest update program the learner compiles for `config` (`rl.packing` layout).

  Packing puts several sequences in a row; the memory bound is the batch whose sequences
  each fill a row, which is also the padded layout's shape (`packing` keeps the padded
  micro-batch's row count).
  """
  r, ppo = config.rollout, methods.of(config).is_ppo
  if ppo:
    n, seq = r.prompts_per_step, rollout_shape(config).slots
    mini, micro = config.ppo.mini_batches, config.ppo.micro_batches
  else:
    n, seq = r.prompts_per_step * config.grpo.group_size, r.prompt_len + r.token_budget
    mini, micro = config.grpo.mini_batches, config.grpo.micro_batches
  per_mini = n // mini
  micro_rows = max(per_mini // micro, 1)
  pack_len = int(config.train.pack_len)
  if not pack_len:
    return UpdateShape(n, seq, seq, mini, per_mini, micro_rows, False)
  row_len = pack_len if pack_len > 0 else seq
  rows, count = packing.mini_batch_rows(per_mini * -(-seq // row_len), micro_rows, shards)
  return UpdateShape(n, seq, row_len, mini, rows, rows // count, True)


def _struct(shape, dtype, mesh, rules=sharding_lib.DEFAULT_RULES):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
      mesh, parallel.batch_spec(mesh, rules, shape)))


def _sharded(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _f32(shapes: dict) -> dict:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def ppo_batch(learner, us: UpdateShape, mesh, rules) -> dict:
  """One mini-batch as `PPOLearner.step` hands it to the updates: what scoring returns."""
  n, s = us.sequences // us.mini_batches, us.seq_len
  ep_dtypes = {"tokens": jnp.int32, "valid": jnp.bool_, "action_mask": jnp.bool_,
               "feedback_mask": jnp.bool_, "logprobs": jnp.float32}
  fields = {f: None for f in episodes_lib.Episodes._fields}
  fields.update({k: _struct((n, s), d, mesh, rules) for k, d in ep_dtypes.items()})
  fields.update(reward=_struct((n,), jnp.float32, mesh, rules),
                last_action=_struct((n,), jnp.int32, mesh, rules))
  ep = episodes_lib.Episodes(**fields)
  sh = learner.shardings
  policy = _sharded(_f32(param_shapes(learner.config)), sh.params)
  critic = _sharded(_f32(parallel.critic_shapes(learner.config)), sh.critic)
  idx = _struct((us.rows, us.row_len), jnp.int32, mesh, rules) if us.packed else None
  shapes = jax.eval_shape(learner.score, policy, policy, critic, ep, idx, idx)
  return {k: _struct(v.shape, v.dtype, mesh, rules) for k, v in shapes.items()}  # rows split


def group_batch(config, us: UpdateShape, mesh, rules) -> dict:
  """One GRPO / LTE mini-batch as `GRPOLearner.step` hands it to the update.

  The fields `algorithms.refined` builds (the sampler's log-probs always; old_logp with several
  mini-batches; ref_logp with a KL term), then, packed, those `GRPOLearner.pack_batch` makes of them ([R, L] per slot,
  per-row `loss_norm`, no `valid`).
  """
  r, s = us.rows, us.row_len
  f32, b, i32 = jnp.float32, jnp.bool_, jnp.int32
  per_slot = {"tokens": i32, "action_mask": b, "old_logp_hinted": f32, "sampler_logp": f32}
  if us.mini_batches > 1:
    per_slot["old_logp"] = f32
  if config.grpo.kl_coef:
    per_slot["ref_logp"] = f32
  per_seq = {"hinted": b, "advantages": f32}
  if us.packed:
    per_slot.update(per_seq, segment_ids=i32, seq_counts=f32)
    out = {k: _struct((r, s), d, mesh, rules) for k, d in per_slot.items()}
    out["loss_norm"] = _struct((r,), f32, mesh, rules)
    return out
  per_slot["valid"] = b
  out = {k: _struct((r, s), d, mesh, rules) for k, d in per_slot.items()}
  out.update({k: _struct((r,), d, mesh, rules) for k, d in per_seq.items()})
  return out


@dataclasses.dataclass
class CompiledUpdate:
  name: str  # update (GRPO / LTE), update_actor, update_critic (PPO)
  shape: UpdateShape
  mesh: dict
  memory: dict
  hlo: str
  compile_s: float = 0.0
  cost: dict | None = None


def memory_figures(compiled) -> dict:
  mem = compiled.memory_analysis()
  return {k: int(getattr(mem, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "alias_size_in_bytes", "peak_memory_in_bytes")}


def _learner_program(config, model: QwenConfig, mesh: Mesh):
  """(model config, learner, update shape, f32 policy shapes placed as the learner places
  them) for compiling the learner's programs from shapes."""
  from mar import setup  # pylint: disable=g-import-not-at-top

  cfg = program_model(config, model)
  rules = parallel.rules_from_config(config)
  learner = setup.make_learner(config, cfg, mesh, rules)
  us = update_shape(config, parallel.batch_shards(mesh, rules))
  return cfg, learner, us, _sharded(_f32(param_shapes(cfg)), learner.shardings.params)


def compile_updates(config, model: QwenConfig, mesh: Mesh) -> list[CompiledUpdate]:
  """Lowers and compiles the learner's jitted update step(s) of `config` on `mesh` (the
  training layout, `config.mesh`) from shapes: f32 params and optimizer states placed as
  `parallel.TrainShardings` places them, one mini-batch of `update_shape`."""
  cfg, learner, us, policy = _learner_program(config, model, mesh)
  rules, sh = parallel.rules_from_config(config), learner.shardings
  if methods.of(config).is_ppo:
    batch = ppo_batch(learner, us, mesh, rules)
    actor, critic_fn = ((learner.packed_updates(us.micro_rows)) if us.packed else
                        (learner.update_actor, learner.update_critic))
    critic = _sharded(_f32(parallel.critic_shapes(cfg)), sh.critic)
    programs = [("update_actor", actor, policy, learner.actor_opt, sh.actor_opt),
                ("update_critic", critic_fn, critic, learner.critic_opt, sh.critic_opt)]
  else:
    batch = group_batch(config, us, mesh, rules)
    fn = learner.packed_update(us.micro_rows) if us.packed else learner.update
    programs = [("update", fn, policy, learner.optimizer, sh.actor_opt)]
  out = []
  for name, fn, params, opt, opt_sh in programs:
    state = _sharded(jax.eval_shape(opt.init, params), opt_sh)
    start = time.perf_counter()
    compiled = fn.lower(params, state, batch).compile()
    out.append(CompiledUpdate(name, us, dict(mesh.shape), memory_figures(compiled),
                              compiled.as_text(), time.perf_counter() - start,
                              cost_figures(compiled)))
  return out


def compile_scoring(config, model: QwenConfig, mesh: Mesh) -> CompiledUpdate:
  """Compiles the learner's scoring of a whole step's batch (one program before the
  updates, its forwards in chunks of the update's micro-batch rows): PPO's pi_old / pi_ref
  log-probs, values and advantages (`score`, padded or packed); GRPO / LTE's log-probs of
  every sequence (`packed_logprobs` / `logprobs`)."""
  cfg, learner, us, policy = _learner_program(config, model, mesh)
  rules, sh = parallel.rules_from_config(config), learner.shardings
  rows = us.rows * us.mini_batches if us.packed else us.sequences
  if methods.of(config).is_ppo:
    n, s = us.sequences, us.seq_len
    fields = {f: None for f in episodes_lib.Episodes._fields}
    fields.update({k: _struct((n, s), d, mesh, rules) for k, d in (
        ("tokens", jnp.int32), ("valid", jnp.bool_), ("action_mask", jnp.bool_),
        ("feedback_mask", jnp.bool_), ("logprobs", jnp.float32))})
    fields.update(reward=_struct((n,), jnp.float32, mesh, rules),
                  last_action=_struct((n,), jnp.int32, mesh, rules))
    critic = _sharded(_f32(parallel.critic_shapes(cfg)), sh.critic)
    idx = _struct((rows, us.row_len), jnp.int32, mesh, rules) if us.packed else None
    ref = policy if config.ppo.kl_coef else None  # as build_run keeps one
    fn, args = learner.score, (policy, ref, critic, episodes_lib.Episodes(**fields), idx, idx)
  else:
    tokens = _struct((rows, us.row_len), jnp.int32, mesh, rules)
    if us.packed:
      fn, args = learner.packed_logprobs, (policy, tokens, tokens)
    else:
      fn, args = learner.logprobs, (policy, tokens, _struct((rows, us.row_len), jnp.bool_,
                                                            mesh, rules))
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return CompiledUpdate("scoring", us, dict(mesh.shape), memory_figures(compiled),
                        compiled.as_text(), time.perf_counter() - start, cost_figures(compiled))


# ----- optimized HLO: collectives in the decode loop -----------------------------------------


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  opcode: str
  line: str


def _split_type(rhs: str) -> tuple[str, str]:
  """'(f32[2], s32[]) op(...)' -> ('(f32[2], s32[])', 'op(...)')."""
  if rhs.startswith("("):
    depth = 0
    for i, ch in enumerate(rhs):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rhs[:i + 1], rhs[i + 1:].lstrip()
  head, _, rest = rhs.partition(" ")
  return head, rest


def parse_hlo(text: str) -> dict[str, list[Instr]]:
  """Computation name -> its instructions."""
  comps: dict[str, list[Instr]] = {}
  current = None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(1)
      comps[current] = []
      continue
    if current is None or " = " not in line:
      continue
    lhs, rhs = line.split(" = ", 1)
    ty, rest = _split_type(rhs.strip())
    op = re.match(r"([\w\-]+)\(", rest)
    name = lhs.strip().removeprefix("ROOT").strip().lstrip("%")
    comps[current].append(Instr(name, ty, op.group(1) if op else "", line))
  return comps


_CALLED = re.compile(r"(?:calls|body|condition|to_apply|true_computation|false_computation|"
                     r"branch_computations)=\{?([%\w.\-, ]+)\}?")


def _called(instr: Instr) -> list[str]:
  out = []
  for group in _CALLED.findall(instr.line):
    out += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
  return out


def _closure(comps, root: str) -> set[str]:
  seen, todo = set(), [root]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for ins in comps[c]:
      todo += _called(ins)
  return seen


def type_bytes(ty: str) -> int:
  total = 0
  for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", ty):
    if dt in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _is_matmul(ins: Instr) -> bool:
  return ins.opcode in ("dot", "convolution") or (
      ins.opcode == "custom-call" and "matmul" in ins.line.lower())


def _counted_loop(cond: list[Instr]) -> bool:
  """Whether a while condition only compares a counter with a constant (a scan / fori_loop)."""
  return bool(cond) and all(i.opcode in ("parameter", "get-tuple-element", "constant", "compare")
                            for i in cond)


def decode_loop_collectives(hlo: str, num_layers: int) -> dict:
  """Collectives in the body of the decode while loop (once per token step).

  The decode loop is the innermost while loop with a data-dependent trip count whose body,
  with all it calls, holds at least 4 matmuls per layer (qkv, o, gate_up, down): outer loops
  (the static engine's turn scan) hold more, the attention block loops inside it fewer, and
  loops of a fixed count (the turn scan, the continuous engine's per-row refill prefill) are
  not per-token loops. In the continuous engine it is the schedule's loop, one token per row
  per iteration; the per-row refill prefill is a counted loop of its own (on v5p its
  reductions are not in the decode loop's closure: 2 per layer with tensor = 2).
  """
  comps = parse_hlo(hlo)
  best = None
  for instrs in comps.values():
    for ins in instrs:
      if ins.opcode != "while":
        continue
      body = re.search(r"body=%?([\w.\-]+)", ins.line).group(1)
      cond = re.search(r"condition=%?([\w.\-]+)", ins.line).group(1)
      if _counted_loop(comps.get(cond, [])):  # turn scans, per-row refill loops
        continue
      closure = _closure(comps, body) | _closure(comps, cond)  # both run every step
      dots = sum(_is_matmul(i) for c in closure for i in comps[c])
      if dots >= 4 * num_layers and (best is None or dots < best[0]):
        best = (dots, body, closure, ins.type)
  if best is None:
    return {"found": False, "count": 0, "bytes": 0, "ops": {}, "dtypes": [], "carried": []}
  ops: dict[str, int] = {}
  dtypes: set[str] = set()
  count = nbytes = 0
  for c in best[2]:
    for ins in comps[c]:
      if ins.opcode in COLLECTIVES:
        count += 1
        nbytes += type_bytes(ins.type)
        ops[ins.opcode] = ops.get(ins.opcode, 0) + 1
        dtypes.update(re.findall(r"\b([a-z]+\d*)\[", ins.type))
  carried = [(dt, tuple(int(d) for d in dims.split(",") if d))
             for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", best[3])]
  return {"found": True, "body": best[1], "matmuls": best[0], "count": count, "bytes": nbytes,
          "ops": ops, "dtypes": sorted(dtypes), "carried": carried}


def _array_types(ty: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", ty) if dt in _DTYPE_BYTES]


def _loop_parts(ins: Instr) -> tuple[str, str]:
  return (re.search(r"body=%?([\w.\-]+)", ins.line).group(1),
          re.search(r"condition=%?([\w.\-]+)", ins.line).group(1))


def layer_loops(comps: dict, num_layers: int) -> list[str]:
  """Body computations of the layer scans: the innermost while loops of `num_layers` trips
  (XLA's `known_trip_count`; else a counter-only condition) whose body, with what it calls,
  holds a layer's 4 projections: the forward's layer and the backward's (rematerialised)."""
  loops = {}  # body -> closure
  for instrs in comps.values():
    for ins in instrs:
      if ins.opcode != "while":
        continue
      body, cond = _loop_parts(ins)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
      layered = (int(trips.group(1)) == num_layers if trips
                 else _counted_loop(comps.get(cond, [])))
      closure = _closure(comps, body)
      if layered and sum(_is_matmul(i) for c in closure for i in comps[c]) >= 4:
        loops[body] = closure
  return [b for b, closure in loops.items()
          if not any(o != b and o in closure for o in loops)]


def weight_sizes(model: QwenConfig) -> set[int]:
  """Element counts of one layer's weights and of the embedding / LM head (the arrays an
  FSDP program gathers whole: `program_collectives`)."""
  shapes = param_shapes(model)
  sizes = {math.prod(v[1:]) for v in shapes["layers"].values()}
  return sizes | {math.prod(shapes[k]) for k in ("embed", "lm_head") if k in shapes}


def program_collectives(hlo: str, weight_sizes: set[int], num_layers: int) -> dict:
  """The collectives of a compiled update program, classified.

  weight_sizes: element counts of the (gathered) weights, one layer's or top-level. An
  all-gather or reduce-scatter whose (gathered) array has a weight's element count moves a
  weight or its gradient; a floating-point one that does not moves activations. `per_layer`
  counts those inside the layer scans' bodies (`layer_loops`), which run once per layer
  and micro-batch: the forward's and the backward's (rematerialised) layer.
  """
  comps = parse_hlo(hlo)
  in_layer = set()
  for body in layer_loops(comps, num_layers):
    in_layer |= _closure(comps, body)
  out = {"weight_all_gathers": 0, "activation_all_gathers": 0, "index_all_gathers": 0,
         "weight_reduce_scatters": 0, "other_reduce_scatters": 0, "all_reduces": 0,
         "all_to_alls": 0, "other": 0, "other_ops": {}, "per_layer": {},
         "activation_all_gather_types": []}
  for comp, instrs in comps.items():
    for ins in instrs:
      op = ins.opcode.removesuffix("-start")
      if op not in COLLECTIVES:
        continue
      arrays = _array_types(ins.type)
      sizes = {math.prod(d) for _, d in arrays}
      floating = any(dt.startswith(("f", "bf")) for dt, _ in arrays)
      if op == "all-gather":
        key = ("weight_all_gathers" if sizes & weight_sizes else
               "activation_all_gathers" if floating else "index_all_gathers")
        if key == "activation_all_gathers":
          out["activation_all_gather_types"].append(ins.type.split("{")[0])
      elif op == "reduce-scatter":
        operand_sizes = set()
        for s in sizes:  # the result is one shard of the weight's gradient
          operand_sizes |= {w for w in weight_sizes if w % s == 0 and w // s > 1}
        key = "weight_reduce_scatters" if operand_sizes else "other_reduce_scatters"
      elif op == "all-reduce":
        key = "all_reduces"
      elif op == "all-to-all":
        key = "all_to_alls"
      else:
        key = "other"
        out["other_ops"][ins.opcode] = out["other_ops"].get(ins.opcode, 0) + 1
      out[key] += 1
      if comp in in_layer:
        out["per_layer"][key] = out["per_layer"].get(key, 0) + 1
  return out


def loop_kv_bytes(carried, model: QwenConfig, slots: int) -> int:
  """Per-device bytes of the KV cache the decode loop carries (from its loop state's shapes).

  A layer's k or v buffer is the rank-4 state of dims {rows, KV heads, slots, head_dim}, and
  of a long cache's window the same with the window's slots in place of slots; one
  [rows, slots] validity mask is counted too (the continuous engine also carries
  [episodes, slots] output masks, which are not cache).
  """
  lengths = {slots, qwen.window_slots(model, slots)} - {0}
  kv = [(dt, dims) for dt, dims in carried if dt in _DTYPE_BYTES and len(dims) == 4
        and lengths & set(dims) and model.head_dim in dims]
  total = sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in kv)
  rows = kv[0][1][0] if kv else None
  if (rows, slots) in [dims for dt, dims in carried if dt == "pred"]:
    total += rows * slots
  return total
