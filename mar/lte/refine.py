"""LTE group refinement: correct hinted rollouts replace failures of all-fail groups.

Layout. P prompts, G rollouts each. Member g of prompt p is row p * G + g of a flat
[P * G, ...] array, or [p, g] of a grouped [P, G, ...] array. Hinted rollouts come as a
group of G per hinted prompt, either for all P prompts ("full", rows of non-none-pass
prompts ignored) or only for the none-pass prompts in increasing prompt order
("compact", H = none_pass.sum() rows). A RefinePlan records, for each member, which hinted
sample (if any) takes its place; apply_plan builds the training batch from it.

Correct means reward > 0 (LTE rewards are 0/1). The group keeps size G; replaced members
are chosen uniformly at random among its failures, and when more than `cap` hinted samples
are correct a uniform random subset of `cap` is used (METHODS §2 step 3).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class RefinePlan:
  """Which members of which groups are replaced, and by which hinted samples.

  Attributes:
    source: int [P, G]; -1 keeps the original member, j >= 0 replaces it by hinted sample
      j of its prompt's hinted group.
    hint_row: int [P]; row of the hinted arrays holding prompt p's hinted group, -1 when p
      is not none-pass.
    num_hint_rows: prompt rows of the hinted arrays (P full, H compact).
    rewards: float [P, G], the refined rewards.
    num_none_pass: prompts whose G rollouts all failed.
    num_rescued: none-pass groups that got >= 1 replacement.
    num_cap_bound: groups with more correct hinted samples than the cap.
    num_replaced: total members replaced.
  """

  source: np.ndarray
  hint_row: np.ndarray
  num_hint_rows: int
  rewards: np.ndarray
  num_none_pass: int
  num_rescued: int
  num_cap_bound: int
  num_replaced: int

  @property
  def hinted(self) -> np.ndarray:
    """bool [P, G]: members that are hinted samples."""
    return self.source >= 0

  def metrics(self) -> dict[str, float]:
    return {
        "lte/num_none_pass": float(self.num_none_pass),
        "lte/num_rescued": float(self.num_rescued),
        "lte/num_cap_bound": float(self.num_cap_bound),
        "lte/num_replaced": float(self.num_replaced),
    }


def _hint_rows(none_pass: np.ndarray, num_rows: int) -> np.ndarray:
  """Maps prompts to rows of the hinted arrays (full or compact layout)."""
  p = none_pass.shape[0]
  h = int(none_pass.sum())
  if num_rows == p:
    rows = np.arange(p)
  elif num_rows == h:
    rows = np.cumsum(none_pass) - 1
  else:
    raise ValueError(
        f"refine.py: hinted arrays have {num_rows} prompt rows, expected P={p} (full) "
        f"or none_pass.sum()={h} (compact)"
    )
  return np.where(none_pass, rows, -1).astype(np.int64)


def refine_groups(
    rewards: np.ndarray,
    hinted_rewards: np.ndarray,
    none_pass: np.ndarray,
    rng: np.random.Generator,
    cap: int | None = None,
) -> RefinePlan:
  """Plans the replacement of failures of none-pass groups by correct hinted samples.

  Args:
    rewards: [P, G] rewards of the original rollouts.
    hinted_rewards: [P, G] (full) or [H, G] (compact) rewards of the hinted rollouts.
    none_pass: [P] bool, True for prompts whose G rollouts all failed.
    rng: randomness for which failures are replaced and, when the cap binds, which
      correct samples are kept. Same generator state -> same plan.
    cap: most replacements per group, default G - 1 (so a group never becomes all-correct,
      which would give it zero advantage).
  """
  rewards = np.asarray(rewards, np.float32)
  hinted_rewards = np.asarray(hinted_rewards, np.float32)
  none_pass = np.asarray(none_pass, bool)
  if rewards.ndim != 2:
    raise ValueError(f"refine.py: rewards must be [P, G], found shape {rewards.shape}")
  p, g = rewards.shape
  if none_pass.shape != (p,):
    raise ValueError(f"refine.py: none_pass must be [P]=({p},), found shape {none_pass.shape}")
  if hinted_rewards.ndim != 2 or hinted_rewards.shape[1] != g:
    raise ValueError(
        f"refine.py: hinted_rewards must be [P or H, G={g}], found shape {hinted_rewards.shape}"
    )
  cap = g - 1 if cap is None else int(cap)
  if not 0 <= cap <= g:
    raise ValueError(f"refine.py: cap must be in [0, G={g}], found {cap}")
  bad = np.flatnonzero(none_pass & (rewards > 0).any(axis=1))
  if bad.size:
    raise ValueError(
        f"refine.py: prompts {bad.tolist()} are marked none_pass but have a reward > 0"
    )

  hint_row = _hint_rows(none_pass, hinted_rewards.shape[0])
  source = np.full((p, g), -1, np.int64)
  refined = rewards.copy()
  num_rescued = num_cap_bound = 0
  for i in np.flatnonzero(none_pass):
    row = hinted_rewards[hint_row[i]]
    correct = np.flatnonzero(row > 0)
    if correct.size > cap:
      num_cap_bound += 1
      correct = np.sort(rng.choice(correct, size=cap, replace=False))
    if correct.size == 0:
      continue
    targets = rng.choice(g, size=correct.size, replace=False)  # all members failed
    source[i, targets] = correct
    refined[i, targets] = row[correct]
    num_rescued += 1
  return RefinePlan(
      source=source,
      hint_row=hint_row,
      num_hint_rows=int(hinted_rewards.shape[0]),
      rewards=refined,
      num_none_pass=int(none_pass.sum()),
      num_rescued=num_rescued,
      num_cap_bound=num_cap_bound,
      num_replaced=int((source >= 0).sum()),
  )


def _gather_index(plan: RefinePlan) -> tuple[np.ndarray, np.ndarray]:
  """Flat member -> (use hinted?, flat row in the hinted arrays)."""
  p, g = plan.source.shape
  use = plan.hinted.reshape(-1)
  rows = np.maximum(plan.hint_row, 0)[:, None] * g + np.maximum(plan.source, 0)
  return use, rows.reshape(-1)


def _as_flat(name: str, which: str, x: np.ndarray, rows: int, g: int) -> tuple[np.ndarray, bool]:
  """Returns (flat [rows * G, ...] view, was_grouped)."""
  x = np.asarray(x)
  if x.ndim >= 1 and x.shape[0] == rows * g:
    return x, False
  if x.ndim >= 2 and x.shape[:2] == (rows, g):
    return x.reshape((rows * g,) + x.shape[2:]), True
  raise ValueError(
      f"refine.py: {which}[{name!r}] has shape {x.shape}, "
      f"expected [{rows * g}, ...] or [{rows}, {g}, ...]"
  )


def apply_plan(
    plan: RefinePlan,
    original: Mapping[str, np.ndarray],
    hinted: Mapping[str, np.ndarray],
    *,
    logp_key: str = "old_logp",
    as_hinted: bool = True,
) -> dict[str, np.ndarray]:
  """Builds the refined batch.

  Args:
    plan: from refine_groups.
    original: per-member arrays of the original rollouts, each [P * G, ...] or [P, G, ...]:
      the UN-hinted prompt tokens and masks, responses, rewards, ... Every key is returned.
    hinted: per-member arrays of the hinted rollouts, [R * G, ...] or [R, G, ...] with R the
      rows of the plan's layout (P full or H compact). Pass response-side fields only (response
      tokens, masks, rewards, old log-probs), NOT the hinted prompt: a key present in both dicts
      takes the hinted value on replaced members, a key only in `original` keeps the
      original value, so replaced members keep the un-hinted prompt. Shapes beyond the
      member axes must match (pad responses to one length before).
    logp_key: the hinted key holding per-token log-probs from the forward over the hinted
      prompt; copied to `old_logp_hinted` (0 on non-hinted members). Optional.
    as_hinted: False for the "GRPO + extra rollouts" baseline, whose replacements were
      sampled from the un-hinted prompt and so are on-policy (hinted flag stays False,
      no old_logp_hinted).

  Returns:
    dict with every original key in its original layout, plus `hinted` (bool per member)
    and, when `logp_key` is in `hinted` and as_hinted, `old_logp_hinted`; these two are
    [P, G, ...] if any original array is grouped, else [P * G, ...].
  """
  p, g = plan.source.shape
  num_rows = plan.num_hint_rows
  use, rows = _gather_index(plan)

  out: dict[str, np.ndarray] = {}
  grouped_layout = False
  for key, value in original.items():
    flat, grouped = _as_flat(key, "original", value, p, g)
    grouped_layout = grouped_layout or grouped
    if key in hinted and use.any():
      src, _ = _as_flat(key, "hinted", hinted[key], num_rows, g)
      if src.shape[1:] != flat.shape[1:]:
        raise ValueError(
            f"refine.py: hinted[{key!r}] member shape {src.shape[1:]} != original {flat.shape[1:]}"
        )
      sel = use.reshape((-1,) + (1,) * (flat.ndim - 1))
      flat = np.where(sel, src[rows].astype(flat.dtype), flat)
    out[key] = flat.reshape(np.shape(value))

  def layout(x):
    return x.reshape(p, g, *x.shape[1:]) if grouped_layout else x

  flag = use if as_hinted else np.zeros_like(use)
  out["hinted"] = layout(flag.copy())
  if as_hinted and logp_key in hinted:
    src, _ = _as_flat(logp_key, "hinted", hinted[logp_key], num_rows, g)
    sel = use.reshape((-1,) + (1,) * (src.ndim - 1))
    if use.any():
      vals = np.where(sel, src[rows], 0).astype(src.dtype)
    else:
      vals = np.zeros((p * g,) + src.shape[1:], src.dtype)
    out["old_logp_hinted"] = layout(vals)
  return out
