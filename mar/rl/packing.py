"""Packed learner batches: sequences laid end to end in fixed-length rows, real tokens only.

The rollout hands the learner [N, S] arrays: one sequence per row, its valid slots
contiguous (left-padded prompt, right-padded response), S = prompt bucket + token budget.
Most of those slots are padding. A `PackPlan` places the sequences' valid spans into
[R, L] rows (first-fit decreasing), each slot remembering where it came from, so that
  pack(x)    [N, S, ...] -> [R, L, ...]  (a gather; padding slots get 0)
  unpack(y)  [R, L, ...] -> [N, S, ...]  (a scatter; slots of no sequence get 0)
work on host numpy arrays and, inside jitted programs, on device arrays alike. Slots carry
`segment_ids` (1, 2, ... per row, 0 = padding): the model attends within a segment and
restarts RoPE positions per segment, so every packed token sees what it saw unpacked.

Sequences are packed per mini-batch (sequences [k N/m, (k+1) N/m) fill their own rows),
so a mini-batch holds the same sequences packed or not. Micro-batches keep the padded
layout's memory bound: at most `micro_rows` rows each (the padded micro-batch's row count,
rows being as wide as the padded ones), so a packed mini-batch has fewer micro-batches
rather than fuller ones. Row and micro-batch counts are rounded up by `bucket_rows` (to a
multiple of the data shards, then at most 3 significant bits), so programs compile for a
few shapes, not once per step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mar import parallel


PAD_INDEX = np.iinfo(np.int32).max


def bucket_rows(rows: int, multiple: int = 1, bits: int = 3) -> int:
  """Rows rounded up to a multiple of `multiple`, then to `bits` significant bits (3: <= 12.5 %
  more)."""
  m = max(-(-rows // multiple), 1)
  shift = max(m.bit_length() - bits, 0)
  m = -(-m >> shift) << shift
  return m * multiple


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """Where each slot of the packed [R, L] rows comes from.

  Attributes:
    index: int32 [R, L], flat slot n * S + s of the unpacked [N, S] layout (offset by
      `base` on several hosts); padding slots hold PAD_INDEX (past any batch's end).
    segment_ids: int32 [R, L]; 1.. per sequence within its row, 0 for padding.
    seq: int32 [R, L]; the sequence n of each slot, -1 for padding.
    shape: (N, S) of the unpacked layout.
    rows_per_mini_batch: R / num_mini_batches.
    micro_batches: micro-batches per mini-batch (each rows_per_mini_batch / micro_batches rows).
  """

  index: np.ndarray
  segment_ids: np.ndarray
  seq: np.ndarray
  shape: tuple[int, int]
  rows_per_mini_batch: int
  micro_batches: int = 1
  # Shared prompts (`plan(..., shared=)`): int32 [R, L] each. prefix_ids: the segment a
  # response slot also attends to (its prompt's copy), 0 elsewhere; rope_positions: RoPE
  # positions; prev: the slot holding each slot's predecessor token (-1: none).
  prefix_ids: np.ndarray | None = None
  rope_positions: np.ndarray | None = None
  prev: np.ndarray | None = None

  @property
  def row_len(self) -> int:
    return self.index.shape[1]

  @property
  def num_rows(self) -> int:
    return self.index.shape[0]

  @property
  def real_tokens(self) -> int:
    return int((self.segment_ids > 0).sum())

  @property
  def positions(self) -> int:
    """Positions the packed rows compute (real tokens + padding)."""
    return int(self.index.size)

  @property
  def valid(self) -> np.ndarray:
    return self.segment_ids > 0


def _spans(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(first valid slot, number of valid slots) per row; valid slots must be contiguous."""
  valid = np.asarray(valid, bool)
  length = valid.sum(1)
  start = np.where(length > 0, valid.argmax(1), 0)
  span = np.arange(valid.shape[1])[None] - start[:, None]
  contiguous = ((span >= 0) & (span < length[:, None])) == valid
  if not contiguous.all():
    bad = int(np.flatnonzero(~contiguous.all(1))[0])
    raise ValueError(f"packing.py: row {bad} of the batch has non-contiguous valid slots")
  return start, length


def _first_fit(lengths: np.ndarray, row_len: int) -> list[list[int]]:
  """Sequences (indices into `lengths`) per row, first-fit decreasing; zero-length skipped."""
  order = sorted((i for i in range(len(lengths)) if lengths[i] > 0),
                 key=lambda i: (-lengths[i], i))
  free: list[int] = []
  rows: list[list[int]] = []
  for i in order:
    if lengths[i] > row_len:
      raise ValueError(f"packing.py: sequence {i} has {lengths[i]} tokens > row length "
                       f"{row_len}")
    for r, room in enumerate(free):
      if room >= lengths[i]:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(row_len - lengths[i])
  for r in rows:
    r.sort()  # within a row, sequences keep their batch order
  return rows


def mini_batch_rows(needed: int, micro_rows: int | None = None, shards: int = 1,
                    bits: int = 3):
  """(rows, micro-batches) of a packed mini-batch that needs `needed` rows.

  Up to `micro_rows` rows: one micro-batch, rows bucketed over `shards`. Beyond: a bucketed
  number of micro-batches of `micro_rows` rows each (a multiple of `shards`). `bits`: the
  buckets' significant bits.
  """
  if micro_rows is None or needed <= micro_rows:
    rows = bucket_rows(needed, shards, bits)
    return (rows if micro_rows is None else min(rows, micro_rows)), 1
  m = bucket_rows(-(-needed // micro_rows), bits=bits)
  return m * micro_rows, m


def _units(start: np.ndarray, length: np.ndarray, shared, row_len: int, first: int,
           last: int) -> list[list[tuple]]:
  """Sequences first..last-1 as units of pieces (seq, first slot, length, is_response).

  Plain (shared None): one piece per sequence. Shared prompts (shared = (tokens, action)):
  a sequence's prompt is its valid slots before its first action token, its response the
  rest of its span; consecutive sequences with equal prompts form a group, and a unit is
  the group's prompt once, then as many of its members' responses as fit in row_len.
  Sequences without an action token are left out (nothing of theirs is trained).
  """
  if shared is None:
    return [[(i, int(start[i]), int(length[i]), False)] for i in range(first, last)
            if length[i] > 0]
  tokens, action = shared
  has_action = action.any(1)
  cut = np.where(has_action, action.argmax(1), 0)  # first action slot
  prompt_of = lambda j: tuple(tokens[j, start[j]:cut[j]])
  units, i = [], first
  while i < last:
    j = i + 1
    while j < last and prompt_of(j) == prompt_of(i):
      j += 1
    lp = int(cut[i] - start[i])
    unit = None
    for m in range(i, j):
      lr = int(start[m] + length[m] - cut[m])
      if not has_action[m]:
        continue
      if lp + lr > row_len:
        raise ValueError(f"packing.py: sequence {m} has {lp + lr} tokens > row length "
                         f"{row_len}")
      if unit is None or sum(x[2] for x in unit) + lr > row_len:
        unit = [(i, int(start[i]), lp, False)]
        units.append(unit)
      unit.append((m, int(cut[m]), lr, True))
    i = j
  return units


def _mini_batch_rows(valid, row_len, num_mini_batches, shared=None):
  """Per mini-batch: its rows, each a list of units (first-fit decreasing by unit length)."""
  start, length = _spans(valid)
  per = len(length) // num_mini_batches
  if shared is not None:
    shared = tuple(np.asarray(x) for x in shared)
  out = []
  for k in range(num_mini_batches):
    units = _units(start, length, shared, row_len, k * per, (k + 1) * per)
    sizes = np.asarray([sum(x[2] for x in u) for u in units], np.int64)
    out.append([[units[u] for u in row] for row in _first_fit(sizes, row_len)])
  return out


def plan(valid: np.ndarray, row_len: int, num_mini_batches: int = 1, shards: int = 1,
         min_rows: int = 0, base: int = 0, micro_rows: int | None = None,
         shared=None) -> PackPlan:
  """Packs the valid spans of an [N, S] batch into rows of `row_len` slots.

  `shards`: row counts are multiples of it (the mesh's batch shards). `micro_rows`: at most
  this many rows per micro-batch (None: one micro-batch per mini-batch).
  `min_rows`: at least this many rows per mini-batch (on several hosts, the largest count
  over hosts, so every host's plan has the same shape). `base`: added to every index
  (this host's first slot in the global [N_global * S] layout).

  `shared` = (tokens, action_mask) [N, S]: consecutive sequences with the same prompt (the
  tokens before their first action) share one copy of it (a GRPO group): each response is
  its own segment that also attends to the prompt's (`prefix_ids`), with RoPE positions
  continuing the prompt's, so every response token sees what it saw unpacked while the
  prompt is computed once per row it is in. Sequences without action tokens are left out.
  The plan then carries prefix_ids, rope_positions and prev; only response slots may be scored
  (`scoring.token_logprobs`' score_slots from `prev`); prompt slots hold the group's first
  member's prompt.
  """
  valid = np.asarray(valid, bool)
  n, s = valid.shape
  if n % num_mini_batches:
    raise ValueError(f"packing.py: {n} sequences are not divisible into {num_mini_batches} "
                     "mini-batches")
  groups = _mini_batch_rows(valid, row_len, num_mini_batches, shared)
  # Shared-prompt rows hold whole groups (~1 per row): their count varies by a row or two
  # from step to step, so it is bucketed coarser (2 significant bits) to compile once.
  rows, micro = mini_batch_rows(max([len(g) for g in groups] + [min_rows, 1]), micro_rows,
                                shards, bits=3 if shared is None else 2)
  total = rows * num_mini_batches
  index = np.full((total, row_len), PAD_INDEX, np.int32)
  seg = np.zeros((total, row_len), np.int32)
  seq = np.full((total, row_len), -1, np.int32)
  prefix = np.zeros((total, row_len), np.int32)
  pos = np.zeros((total, row_len), np.int32)
  prev = np.full((total, row_len), -1, np.int32)
  for k, group in enumerate(groups):
    for r, units in enumerate(group):
      at, row, j = 0, k * rows + r, 0
      for unit in units:
        head_seg, head_end, head_len = j + 1, at + unit[0][2] - 1, unit[0][2]
        for i, first, ln, response in unit:
          j += 1
          index[row, at:at + ln] = base + i * s + first + np.arange(ln)
          seg[row, at:at + ln] = j
          seq[row, at:at + ln] = i
          prev[row, at + 1:at + ln] = at + np.arange(ln - 1)
          if response:  # after its unit's prompt
            prefix[row, at:at + ln] = head_seg
            pos[row, at:at + ln] = head_len + np.arange(ln)
            prev[row, at] = head_end if head_len else -1
          else:
            pos[row, at:at + ln] = np.arange(ln)
          at += ln
  extra = dict(prefix_ids=prefix, rope_positions=pos, prev=prev) if shared is not None else {}
  return PackPlan(index, seg, seq, (n, s), rows, micro, **extra)


def rows_needed(valid: np.ndarray, row_len: int, num_mini_batches: int = 1,
                shared=None) -> int:
  """Rows per mini-batch before bucketing (to agree on `min_rows` across hosts)."""
  groups = _mini_batch_rows(np.asarray(valid, bool), row_len, num_mini_batches, shared)
  return max(len(g) for g in groups)


def host_plan(valid, row_len: int, num_mini_batches: int = 1, micro_batches: int | None = None,
              shards: int = 1, global_index: bool = False, shared=None) -> PackPlan:
  """This host's plan for its rows of a learner batch (every host calls it: a collective).

  row_len <= 0: the batch's own width. On several hosts each packs its own rows with the
  same row count (the largest any host needs); mini-batch k of the global batch is then
  made of whole hosts' mini-batches, as in the padded layout. `micro_batches`: the padded
  layout's micro-batch count, whose row count bounds the packed micro-batches (None: no
  micro-batching, e.g. a log-prob pass). `global_index`: index the global [N_all, S] layout.
  `shared`: (tokens, action_mask) to share prompts (see `plan`).
  """
  valid = np.asarray(valid, bool)
  n, s = valid.shape
  hosts = jax.process_count()
  local_mb = max(num_mini_batches // hosts, 1)
  hosts_per_mb = max(hosts // num_mini_batches, 1)
  row_len = row_len if row_len > 0 else s
  micro_rows = None
  if micro_batches is not None:
    micro_rows = max(n * hosts // num_mini_batches // micro_batches // hosts_per_mb, 1)
  rows = parallel.max_over_hosts(rows_needed(valid, row_len, local_mb, shared))
  base = jax.process_index() * n * s if global_index else 0
  return plan(valid, row_len, local_mb, shards, min_rows=rows, base=base,
              micro_rows=micro_rows, shared=shared)


# ----- moving data in and out of the packed layout (numpy or jax.numpy) -------------------


def pack(x, index, segment_ids, xp=np, base: int = 0):
  """[N, S, ...] -> [R, L, ...] by the plan's flat index; padding slots get 0."""
  flat = x.reshape((-1,) + x.shape[2:])
  idx = xp.clip(index - base, 0, flat.shape[0] - 1)
  out = flat[idx]
  keep = (segment_ids > 0).reshape(segment_ids.shape + (1,) * (out.ndim - 2))
  return xp.where(keep, out, xp.zeros((), out.dtype))


def unpack(y, index, shape: tuple[int, int], xp=np, base: int = 0):
  """[R, L, ...] -> [N, S, ...] (shape = (N, S)); slots no sequence fills get 0."""
  n, s = shape
  idx = (index - base).reshape(-1)
  vals = y.reshape((-1,) + y.shape[2:])
  if xp is np:
    out = np.zeros((n * s,) + y.shape[2:], y.dtype)
    real = idx < n * s
    out[idx[real]] = vals[real]
  else:
    out = xp.zeros((n * s,) + y.shape[2:], y.dtype).at[idx].set(vals, mode="drop")
  return out.reshape((n, s) + y.shape[2:])


def per_sequence(v, seq, xp=np):
  """Per-sequence values [N, ...] -> per slot [R, L, ...] (padding slots get 0)."""
  out = v[xp.maximum(seq, 0)]
  keep = (seq >= 0).reshape(seq.shape + (1,) * (out.ndim - 2))
  return xp.where(keep, out, xp.zeros((), out.dtype))


def pack_host(batch: dict, p: PackPlan, per_seq_keys=()) -> dict:
  """Host: an [N, S] batch dict -> packed numpy arrays (plus `segment_ids`, `valid`).

  Keys in `per_seq_keys` hold one value per sequence ([N]) and are spread over its slots.
  The plan must be host-local (base 0).
  """
  out = {"segment_ids": p.segment_ids, "valid": p.valid}
  for k, v in batch.items():
    if k == "valid":
      continue
    v = np.asarray(v)
    out[k] = (per_sequence(v, p.seq) if k in per_seq_keys else
              pack(v, p.index, p.segment_ids))
  return out


def sequence_counts(mask: np.ndarray, seq: np.ndarray) -> np.ndarray:
  """float32 [R, L]: at each packed slot, the number of `mask` tokens of its sequence.

  `mask` is packed [R, L]; the count lets a per-sequence token mean be taken in the packed
  layout (sum over slots of value / count).
  """
  n = int(seq.max(initial=-1)) + 1
  counts = np.bincount(seq[mask & (seq >= 0)], minlength=max(n, 1)).astype(np.float32)
  return np.where(seq >= 0, counts[np.maximum(seq, 0)], 0.0).astype(np.float32)
