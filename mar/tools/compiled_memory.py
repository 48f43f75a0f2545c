"""What XLA itself says a config's rollout program needs: compiled with no weights.

`compile_rollout` lowers the trainer's rollout program for a config (`rollout.engine`: the
continuous engine's queue program, `mar.rollout.continuous.rollout`, or the static one's
prefill, turn scan and while-loop decode, `mar.rollout.multi_attempt.rollout`) on the
sampling layout (`parallel.sampling_mesh`: rows over 'data', weights in the sampling dtype
over 'tensor') from `jax.ShapeDtypeStruct`s only, and reads XLA's memory analysis of the
compiled program. `decode_loop_collectives` parses its optimized HLO: the decode loop is the
innermost while loop whose body (with everything it calls) runs the whole model; the
collectives there run once per token step.

Used by `python -m mar.tools.plan_memory --compiled`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mar import parallel
from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig, dtype_from_name
from mar.models.init import init_params
from mar.rollout import continuous
from mar.rollout import multi_attempt as ma
from mar.rollout import runner as runner_lib
from mar import sampling
from mar.sampling import SamplingParams
from mar.sampling.stop import boxed_stop_predicate

FEEDBACK_LEN = 24  # as plan_memory.FEEDBACK_LEN: one multi-attempt feedback turn, rounded up
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
  spec: ma.RolloutSpec
  queue: int  # episodes of one step, padded to a multiple of rows (the continuous engine's Q)

  @property
  def slots(self) -> int:
    return self.spec.cache_len


def rollout_shape(config) -> RolloutShape:
  r, ppo = config.rollout, config.method == "ppo"
  attempts = r.max_attempts if ppo else 1
  rows = r.batch_size or r.prompts_per_step * (1 if ppo else config.grpo.group_size)
  feedback = max(FEEDBACK_LEN, r.hint_feedback_len) if attempts > 1 else r.hint_feedback_len
  spec = ma.RolloutSpec(
      max_attempts=attempts, token_budget=r.token_budget,
      cache_len=ma.cache_len_for(r.prompt_len, r.token_budget, attempts, feedback),
      sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
      stop_ids=STOP_IDS, check_every=r.check_every, hint_feedback_len=r.hint_feedback_len)
  episodes = r.prompts_per_step * (1 if ppo else config.grpo.group_size)
  return RolloutShape(rows, r.prompt_len, attempts, spec, rows * max(1, -(-episodes // rows)))


def sampling_model(config, model: QwenConfig) -> QwenConfig:
  return model.replace(dtype=dtype_from_name(config.model.dtype), remat=config.model.remat)


def _no_verdicts(example_ids, tokens, start, end, live, turn):  # never runs: compile only
  del tokens, start, end, turn
  return np.zeros_like(live), np.zeros_like(live)


class _NoVerifier:
  """The continuous engine's verifier interface, for compiling only."""

  verify_rows = staticmethod(_no_verdicts)

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


def compile_rollout(config, model: QwenConfig, mesh: Mesh) -> CompiledRollout:
  """Lowers and compiles the rollout program of `config` on `mesh` (the sampling layout)."""
  model = sampling_model(config, model)
  rs = rollout_shape(config)
  dtype = parallel.sampling_dtype(model) or jnp.float32
  p_sh = parallel.sampling_shardings(model, mesh)
  p_shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  params = unstacked_structs(
      jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                   p_shapes, p_sh))
  rows_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                    (rs.rows,)))
  rows2_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                     (rs.rows, rs.prompt_len)))
  rep = NamedSharding(mesh, PartitionSpec())
  m = rs.attempts
  args = (
      jax.ShapeDtypeStruct((rs.rows, rs.prompt_len), jnp.int32, sharding=rows2_sh),
      jax.ShapeDtypeStruct((rs.rows, rs.prompt_len), jnp.bool_, sharding=rows2_sh),
      jax.ShapeDtypeStruct((rs.rows,), jnp.int32, sharding=rows_sh),
      jax.ShapeDtypeStruct((rs.rows,), jnp.int32, sharding=rows_sh),
      jax.ShapeDtypeStruct((m, FEEDBACK_LEN), jnp.int32, sharding=rep),
      jax.ShapeDtypeStruct((m,), jnp.int32, sharding=rep),
      jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
  )
  pred = boxed_stop_predicate(_token_strings(model.vocab_size))
  callbacks = m > 1 or bool(rs.spec.hint_feedback_len)
  if config.rollout.engine == "continuous":
    fn, args = _continuous_program(config, model, rs, mesh, pred, callbacks, args)
  else:
    verify = _no_verdicts if callbacks else None
    decode = functools.partial(sampling.decode, mesh=mesh)  # as the runner passes it
    fn = jax.jit(lambda params, *a: ma.rollout(model, params, rs.spec, pred, verify, *a,
                                               decode_fn=decode))
  compiled = fn.lower(params, *args).compile()
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "alias_size_in_bytes", "peak_memory_in_bytes")}
  kv_all = kv_bytes(model, rs.rows, rs.slots, dtype)
  data = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  shards = data if rs.rows % data == 0 else 1
  tp = mesh.shape["tensor"] if model.num_kv_heads % mesh.shape["tensor"] == 0 else 1
  return CompiledRollout(rs, dict(mesh.shape), memory, kv_all // shards // tp, kv_all,
                         compiled.as_text())


def _continuous_program(config, model, rs: RolloutShape, mesh, pred, callbacks: bool,
                        static_args: tuple):
  """The continuous engine's program (as `RolloutRunner._engine_for` builds it) and its args.

  The queue holds the step's Q episodes; the static engine's args give the dtypes and the
  feedback table / key.
  """
  r = config.rollout
  espec = continuous.EngineSpec(
      rs.spec, rows=rs.rows, refill_rows=r.refill_rows, refill_wait=r.refill_wait,
      verify_every=r.verify_every, prompt_widths=runner_lib.prompt_buckets(rs.prompt_len)[:-1])
  queue_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                     (rs.queue,)))
  queue2_sh = NamedSharding(mesh, parallel.batch_spec(mesh, sharding_lib.DEFAULT_RULES,
                                                      (rs.queue, rs.prompt_len)))
  tokens, mask, attempts, _, fb_tokens, fb_lengths, key = static_args
  args = (jax.ShapeDtypeStruct((rs.queue, rs.prompt_len), tokens.dtype, sharding=queue2_sh),
          jax.ShapeDtypeStruct((rs.queue, rs.prompt_len), mask.dtype, sharding=queue2_sh),
          jax.ShapeDtypeStruct((rs.queue,), attempts.dtype, sharding=queue_sh),
          # Unplaced, as the runner passes them (numpy): the engine closes over them inside
          # its shard_map, where a value placed on the (automatic) mesh may not be indexed.
          *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (fb_tokens, fb_lengths, key)))
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
  """k and v of every layer plus the validity mask, all rows."""
  kv = 2 * model.num_layers * rows * model.num_kv_heads * slots * model.head_dim
  return kv * np.dtype(dtype).itemsize + rows * slots


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
  per iteration (its refill and verification branches included).
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


def loop_kv_bytes(carried, model: QwenConfig, slots: int) -> int:
  """Per-device bytes of the KV cache the decode loop carries (from its loop state's shapes).

  A layer's k or v buffer is the rank-4 state of dims {rows, KV heads, slots, head_dim};
  the [rows, slots] validity mask is counted too.
  """
  total = 0
  for dt, dims in carried:
    if dt not in _DTYPE_BYTES:
      continue
    is_kv = len(dims) == 4 and slots in dims and model.head_dim in dims
    is_valid = dt == "pred" and len(dims) == 2 and dims[1] == slots
    if is_kv or is_valid:
      total += _DTYPE_BYTES[dt] * math.prod(dims)
  return total
