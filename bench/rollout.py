"""Rollout scheduling: the continuous engine against today's static batches.

`python bench/rollout.py --scripted` (counts only, seconds on a CPU) draws the two workloads of
issue 15 with seed 0, runs the continuous engine's own scheduler (`mar.rollout.schedule`, the
loop the real engine runs, with the model replaced by scripted lengths) at B = 256 rows, and
prints one JSON object; for each of `grpo` and `multi_attempt`:

  rows, sequences, tokens (sampled, stop tokens included), decode_steps (the engine's),
  ideal_steps (first-in-first-out continuous schedule with free prefill, verification and
  feedback), static_steps (today's engine: sequential chunks of B, each waiting for its
  longest; multi-attempt turns each waiting for the longest live row), slot_utilization
  (tokens / (rows x decode_steps)), prefill_rows, prefill_calls, checks.

`python bench/rollout.py` (timed, minutes on a CPU) runs the same two workloads with lengths
divided by `--scale` on a randomly initialised medium model (bench/sampler.py's "medium"), old
engine (`multi_attempt.rollout` in chunks of B) against the continuous engine, in one process:
tokens are sampled from the model (temperature 1) and each attempt is stopped at its scripted
length, so every decode step costs what a real one costs; verdicts come from the workload's
table through a host callback. Prints per workload: decode steps, utilisation, wall seconds
(compile excluded: each program runs once to compile, then timed), and old / new ratios.
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
  """Today's engine: chunks of `rows` episodes; each turn waits for its longest live row."""
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


# ----- the timed run: real forward passes, scripted lengths ------------------------------------


MEDIUM = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=8,
              num_heads=12, num_kv_heads=4, head_dim=64)
PROMPT_LEN = 64


class TableVerifier:
  """Verdicts from a workload table [Q, M]: the old engine's per-turn callback and the new one's."""

  def __init__(self, verdicts):
    self.verdicts = np.asarray(verdicts, bool)
    self.offset = 0  # the old engine's chunk: example ids are chunk rows
    self.stalled = 0.0

  def __call__(self, example_ids, tokens, start, end, live, turn=0):
    ids = np.asarray(example_ids) + self.offset
    ok = self.verdicts[np.minimum(ids, len(self.verdicts) - 1), int(turn)]
    return ok & live, live.copy()

  def verify_rows(self, seq_ids, tokens, start, end, live, turns):
    ok = self.verdicts[np.asarray(seq_ids), np.minimum(np.asarray(turns), self.verdicts.shape[1] - 1)]
    return ok & live, live.copy()


def scaled(w: dict, scale: float) -> dict:
  lengths = np.maximum(np.round(w["lengths"] / scale), 1).astype(np.int32)
  return dict(w, lengths=lengths, budget=max(1, int(round(w["budget"] / scale))))


def timed(rows: int, n: int, scale: float, seed: int = 0, feedback_len: int = 8) -> dict:
  """Old engine vs continuous engine on the medium model; see the module docstring."""
  import functools  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mar import sampling  # pylint: disable=g-import-not-at-top
  from mar.models import init as init_lib  # pylint: disable=g-import-not-at-top
  from mar.models import model as qwen  # pylint: disable=g-import-not-at-top
  from mar.models.config import QwenConfig  # pylint: disable=g-import-not-at-top
  from mar.rollout import continuous  # pylint: disable=g-import-not-at-top
  from mar.rollout import multi_attempt as ma  # pylint: disable=g-import-not-at-top
  from mar.sampling import refill  # pylint: disable=g-import-not-at-top

  cfg = QwenConfig(model_type="qwen3", **MEDIUM)
  params = qwen.unstack_layers(init_lib.init_params(cfg, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  out = {"rows": rows, "sequences": n, "scale": scale, "model": MEDIUM,
         "device": jax.devices()[0].device_kind}
  temp = sampling.SamplingParams(temperature=1.0)
  for name, w in (("grpo", grpo_workload(seed, n)), ("multi_attempt",
                                                      multi_attempt_workload(seed, n))):
    w = scaled(w, scale)
    m, budget = w["max_attempts"], w["budget"]
    lengths = jnp.asarray(w["lengths"])
    plen = rng.integers(PROMPT_LEN // 4, PROMPT_LEN + 1, n)
    ptoks = rng.integers(1, cfg.vocab_size, (n, PROMPT_LEN)).astype(np.int32)
    pmask = np.arange(PROMPT_LEN)[None] >= (PROMPT_LEN - plen)[:, None]
    fb_t = np.full((m, feedback_len), 7, np.int32)
    fb_l = np.array([0] + [feedback_len] * (m - 1), np.int32)
    spec = ma.RolloutSpec(m, budget, ma.cache_len_for(PROMPT_LEN, budget, m, feedback_len),
                          temp, stop_ids=())
    verifier = TableVerifier(w["verdicts"])
    vfn = None if m == 1 else verifier
    counter = sampling.StopPredicate(
        (), lambda t, b: jnp.zeros((b,), jnp.int32), lambda t, s, tok, live: (s, live & False),
        "count")

    decode = sampling.decode

    def forced_decode(table, config, params, state, *, max_new, sampling, stop_ids,  # pylint: disable=redefined-outer-name
                      stop_predicate, check_every):
      del stop_ids, stop_predicate, check_every
      b = state.pos.shape[0]
      turn = jnp.minimum(state.stop_state, m - 1)
      lim = jnp.where(max_new > 0, jnp.minimum(max_new, table[jnp.arange(b), turn]), 0)
      st = decode(config, params, state, max_new=lim, sampling=sampling)
      return st._replace(stop_state=state.stop_state + (max_new > 0).astype(jnp.int32))

    old = jax.jit(lambda params, table, *a: ma.rollout(
        cfg, params, spec, counter, vfn, *a, decode_fn=functools.partial(forced_decode, table)))

    def choose(logits, keys, ctl):
      tok, lp = refill.sample_rows(logits, keys, temp)
      q = jnp.minimum(ctl.seq, n - 1)
      return tok, lp, ctl.num_new + 1 >= lengths[q, jnp.minimum(ctl.attempt, m - 1)]

    espec = continuous.EngineSpec(spec, rows=rows)
    new = jax.jit(lambda params, *a: continuous.rollout(
        cfg, params, espec, None, vfn, *a, choose_fn=choose))
    attempts = jnp.asarray(w["n_attempts"])

    def run_old():
      for c, lo in enumerate(range(0, n, rows)):
        verifier.offset = lo
        sl = slice(lo, lo + rows)
        ep = old(params, lengths[sl], ptoks[sl], pmask[sl], attempts[sl],
                 jnp.arange(rows, dtype=jnp.int32), fb_t, fb_l, jax.random.key(c))
        jax.block_until_ready(ep)

    def run_new():
      return jax.block_until_ready(new(params, ptoks, pmask, attempts, fb_t, fb_l,
                                       jax.random.key(0)))

    t0 = time.perf_counter()
    run_old()
    t1 = time.perf_counter()
    run_old()
    t2 = time.perf_counter()
    run_new()
    t3 = time.perf_counter()
    _, stats = run_new()
    t4 = time.perf_counter()
    stats = {k: int(v) for k, v in jax.device_get(stats).items()}
    attempts_made = episode_attempts(w)
    tokens = sum(map(sum, attempts_made))
    static = static_steps(attempts_made, rows)
    out[name] = {
        "tokens": tokens, "lengths_median": float(np.median(w["lengths"][:, 0])),
        "budget": budget,
        "old": {"decode_steps": static, "slot_utilization": round(tokens / (rows * static), 4),
                "wall_s": round(t2 - t1, 2), "first_call_s": round(t1 - t0, 2)},
        "new": {"decode_steps": stats["decode_steps"],
                "slot_utilization": round(stats["sampled"] / (rows * stats["decode_steps"]), 4),
                "prefill_rows": stats["prefill_rows"], "prefill_calls": stats["prefill_calls"],
                "wall_s": round(t4 - t3, 2), "first_call_s": round(t3 - t2, 2)},
        "ideal_steps": ideal_steps([sum(a) for a in attempts_made], rows),
    }
    out[name]["wall_ratio_old_new"] = round((t2 - t1) / max(t4 - t3, 1e-9), 2)
    out[name]["step_ratio_old_new"] = round(static / stats["decode_steps"], 2)
    print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
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
  parser.add_argument("--scripted", action="store_true", help="counts only (no model, no timing)")
  parser.add_argument("--rows", type=int, default=ROWS)
  parser.add_argument("--k_sweep", action="store_true",
                      help="with --scripted: multi-attempt counts against verify_every")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sequences", type=int, default=64, help="timed run: queue length")
  parser.add_argument("--timed_rows", type=int, default=16, help="timed run: rows B")
  parser.add_argument("--scale", type=float, default=30.0, help="timed run: lengths / scale")
  args = parser.parse_args(argv)
  if args.scripted:
    out = scripted(args.rows, args.seed)
    if args.k_sweep:
      out["multi_attempt"]["verify_every_sweep"] = verify_every_sweep(args.rows, args.seed)
    print(json.dumps(out))
    return
  print(json.dumps(timed(args.timed_rows, args.sequences, args.scale, args.seed)))


if __name__ == "__main__":
  main()
