"""Rollout scheduling: the engine's scheduler against static batches, in decode steps.

`python bench/rollout.py` (counts only, seconds on a CPU) draws the two workloads of
issue 15 with seed 0, runs the continuous engine's own scheduler (`mar.rollout.schedule`, the
loop the real engine runs, with the model replaced by scripted lengths) at B = 256 rows, and
prints one JSON object; for each of `grpo` and `multi_attempt`:

  rows, sequences, tokens (sampled, stop tokens included), decode_steps (the engine's),
  ideal_steps (first-in-first-out continuous schedule with free prefill, verification and
  feedback), static_steps (a static engine: sequential chunks of B, each waiting for its
  longest; multi-attempt turns each waiting for the longest live row), slot_utilization
  (tokens / (rows x decode_steps)), prefill_rows, prefill_calls, checks.

The static engine those counts compare with (one program per chunk of B rows, a scan over
turns) left the library with issue 25; its wall-time comparison on the medium model, measured
before then, stays in bench/results/cpu_rollout.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mar.rollout import schedule  # noqa: E402  pylint: disable=g-import-not-at-top

ROWS = 256
FEEDBACK_LEN = 25  # tokens of METHODS.md's feedback turn with the Qwen tokenizer (about)


def grpo_workload(seed: int = 0, n: int = 1024, median: float = 900, sigma: float = 0.8,
                  cap: int = 8192) -> dict:
  """Single-turn lengths (sampled tokens, stop included), lognormal, capped."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(np.int32)
  return {"lengths": lengths[:, None], "verdicts": np.zeros((n, 1), bool),
          "n_attempts": np.ones(n, np.int32), "budget": cap, "max_attempts": 1}


def multi_attempt_workload(seed: int = 0, n: int = 1024, max_attempts: int = 5,
                           median: float = 400, sigma: float = 0.8, p_first: float = 0.45,
                           p_later: float = 0.25, budget: int = 3000) -> dict:
  """N ~ U{1..M} attempts, lognormal attempt lengths, success p_first then p_later."""
  rng = np.random.default_rng(seed + 1)
  n_attempts = rng.integers(1, max_attempts + 1, n).astype(np.int32)
  lengths = np.maximum(np.round(rng.lognormal(np.log(median), sigma, (n, max_attempts))),
                       1).astype(np.int32)
  p = np.full((n, max_attempts), p_later)
  p[:, 0] = p_first
  verdicts = rng.random((n, max_attempts)) < p
  return {"lengths": lengths, "verdicts": verdicts, "n_attempts": n_attempts,
          "budget": budget, "max_attempts": max_attempts}


def episode_attempts(w: dict) -> list[list[int]]:
  """Per episode, the sampled length of each attempt made (METHODS.md §1 on the host)."""
  out = []
  for q in range(len(w["n_attempts"])):
    left, made = w["budget"], []
    for t in range(int(w["n_attempts"][q])):
      made.append(min(int(w["lengths"][q, t]), left))
      left -= made[-1]
      if w["verdicts"][q, t] or left <= 0:
        break
    out.append(made)
  return out


def ideal_steps(busy: list[int], rows: int) -> int:
  """Makespan of the continuous schedule: each episode, in queue order, takes the first free row."""
  free = [0] * rows
  end = 0
  for length in busy:
    start = heapq.heappop(free)
    end = max(end, start + length)
    heapq.heappush(free, start + length)
  return end


def static_steps(attempts: list[list[int]], rows: int) -> int:
  """A static engine (the library's before issue 15): chunks of `rows` episodes; each turn waits for its longest live row."""
  total = 0
  for lo in range(0, len(attempts), rows):
    chunk = attempts[lo:lo + rows]
    turns = max(len(a) for a in chunk)
    total += sum(max(a[t] if t < len(a) else 0 for a in chunk) for t in range(turns))
  return total


def scripted(rows: int = ROWS, seed: int = 0, refill_rows: int | None = None,
             refill_wait: int = 16, verify_every: int = 8) -> dict:
  """The JSON object of `--scripted`."""
  out = {}
  for name, w in (("grpo", grpo_workload(seed)), ("multi_attempt", multi_attempt_workload(seed))):
    spec = schedule.ScheduleSpec(
        max_attempts=w["max_attempts"], token_budget=w["budget"],
        refill_rows=refill_rows or max(1, rows // 16), refill_wait=refill_wait,
        verify_every=verify_every, deferred=w["max_attempts"] == 1)
    counts = schedule.scripted_counts(spec, rows, w["lengths"], w["verdicts"], w["n_attempts"],
                                      feedback_len=FEEDBACK_LEN)
    attempts = episode_attempts(w)
    tokens = sum(map(sum, attempts))
    if tokens != counts["sampled"]:
      raise AssertionError(f"{name}: engine sampled {counts['sampled']} tokens, "
                           f"the episodes hold {tokens}")
    steps = counts["decode_steps"]
    out[name] = {
        "rows": rows, "sequences": len(attempts), "tokens": tokens, "decode_steps": steps,
        "ideal_steps": ideal_steps([sum(a) for a in attempts], rows),
        "static_steps": static_steps(attempts, rows),
        "slot_utilization": round(tokens / (rows * steps), 4),
        "prefill_rows": counts["prefill_rows"], "prefill_calls": counts["prefill_calls"],
        "checks": counts["checks"],
        "refill_rows": spec.refill_rows, "refill_wait": spec.refill_wait,
        "verify_every": spec.verify_every,
    }
  return out


def verify_every_sweep(rows: int = ROWS, seed: int = 0, ks=(1, 2, 4, 8, 16, 32)) -> dict:
  """Multi-attempt: decode steps and verification callbacks against the check interval k."""
  w = multi_attempt_workload(seed)
  out = {}
  for k in ks:
    spec = schedule.ScheduleSpec(max_attempts=w["max_attempts"], token_budget=w["budget"],
                                 refill_rows=max(1, rows // 16), verify_every=k)
    c = schedule.scripted_counts(spec, rows, w["lengths"], w["verdicts"], w["n_attempts"],
                                 feedback_len=FEEDBACK_LEN)
    out[str(k)] = {"decode_steps": c["decode_steps"], "checks": c["checks"],
                   "waiting_row_steps": c["verify_waits"]}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scripted", action="store_true", help="accepted for old command lines")
  parser.add_argument("--rows", type=int, default=ROWS)
  parser.add_argument("--k_sweep", action="store_true",
                      help="with --scripted: multi-attempt counts against verify_every")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  out = scripted(args.rows, args.seed)
  if args.k_sweep:
    out["multi_attempt"]["verify_every_sweep"] = verify_every_sweep(args.rows, args.seed)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
