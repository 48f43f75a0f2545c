"""DAPO's dynamic sampling on the demo task: over-sampling inside the engine's queue against
regenerating the batch.

  python bench/dynamic_sampling.py [--windows 4] [--group 8] [--rows 32] [--out FILE]

Loads the demo's LTE model (configs/demo.py:lte: the warm start, cached under $MAR_CACHE) and
samples GRPO groups of G of the demo's synthetic questions with the real continuous engine and
verifier (run to EOS, the demo's 24-token budget, temperature 1), no training. For each of
`--windows` windows of the data order (each starting at the same position for both methods)
it needs `prompts` (16) groups whose rewards are not all equal, drawing at most
(1 + max_oversample) x prompts groups (max_oversample 2), two ways:

  in_engine   one queue of all the candidate groups that closes once a decided prefix holds
              `prompts` informative groups (`grpo.dynamic_sampling`: verdicts in the program,
              rows past the prefix freed);
  regenerate  what verl / OpenRLHF do: a batch of `prompts` groups is generated, groups with
              equal rewards are dropped, and the next `prompts` prompts are generated while
              the batch is short (one program each), up to the same bound.

Per method it prints (summed over windows): decode_steps (the engine's own counter; for
regenerate also first_batch_steps, its first program's: a step without dynamic sampling),
what the groups it trained on would cost alone, had an oracle skipped every uninformative
group (per window, from their episodes' sampled lengths): ideal_steps (the first-free-row
continuous schedule, free prefill and verification: `bench/rollout.py`'s `ideal_steps`) and
oracle_steps (the engine's own scheduler, `rollout.schedule` on scripted lengths, on a queue
of just those episodes: refills of B / 16 rows, as the real program pays them);
extra_over_ideal / extra_over_oracle = decode_steps - either (and their fractions),
groups_sampled, informative groups, tokens sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import demo as demo_config  # noqa: E402
from mar import algorithms
from mar import setup, train  # noqa: E402
from mar.lte import hints  # noqa: E402
from mar.rollout import schedule  # noqa: E402
import rollout as rollout_bench  # noqa: E402  (ideal_steps)


def _texts(run, examples, g):
  plain = [hints.chat_prompt(hints.plain_prompt(ex.question)) for ex in examples]
  return [t for t in plain for _ in range(g)], [ex.answer for ex in examples for _ in range(g)]


def _informative(correct, g):
  hits = np.asarray(correct).reshape(-1, g).sum(1)
  return (hits > 0) & (hits < g)


def _ideals(lengths, rows, config) -> dict:
  """What the trained groups' episodes (sampled lengths) cost alone, with no uninformative
  group sampled: `ideal_steps` (first free row, free prefill) and `oracle_steps` (the
  engine's own scheduler on a queue of just them, verified after the program)."""
  r = config.rollout
  spec = schedule.ScheduleSpec(max_attempts=1, token_budget=r.token_budget,
                               refill_rows=r.refill_rows or max(1, rows // 16),
                               refill_wait=r.refill_wait, verify_every=r.verify_every,
                               deferred=True, keep_stop_token=True)
  n = len(lengths)
  counts = schedule.scripted_counts(spec, rows, np.asarray(lengths)[:, None],
                                    np.zeros((n, 1), bool), np.ones(n, np.int32))
  return {"ideal_steps": rollout_bench.ideal_steps(lengths, rows),
          "oracle_steps": counts["decode_steps"]}


def in_engine(run, params, examples, g, needed, key, rows, config):
  texts, golds = _texts(run, examples, g)
  host, verified, admitted = run.runner.run_groups(params, texts, golds, key, group_size=g,
                                                   needed=needed)
  steps = run.runner.take_stats()["rollout/decode_steps"]
  done, informative = schedule.group_verdicts(verified, host.correct, g)
  _, cutoff = schedule.decided_prefix(done, informative, needed)
  chosen = np.flatnonzero(informative[:int(cutoff)])[:needed]
  sampled = admitted.reshape(-1, g).any(1)
  lengths = [len(host.responses[q * g + j]) for q in chosen for j in range(g)]
  return {"decode_steps": steps, **_ideals(lengths, rows, config),
          "groups_sampled": int(sampled.sum()), "informative": int(len(chosen)),
          "tokens": int(sum(len(r) for r, a in zip(host.responses, admitted) if a))}


def regenerate(run, params, examples, g, needed, key, rows, config):
  out = {"decode_steps": 0.0, "first_batch_steps": 0.0, "ideal_steps": 0, "groups_sampled": 0,
         "informative": 0, "tokens": 0}
  kept = []  # (host view, group) of the informative groups so far
  for b, lo in enumerate(range(0, len(examples), needed)):
    texts, golds = _texts(run, examples[lo:lo + needed], g)
    host = run.runner.run_host(params, texts, golds, jax.random.fold_in(key, b))
    steps = run.runner.take_stats()["rollout/decode_steps"]
    out["decode_steps"] += steps
    if b == 0:  # a step without dynamic sampling: one program of `prompts` groups
      out["first_batch_steps"] = steps
    out["groups_sampled"] += len(texts) // g
    out["tokens"] += sum(len(r) for r in host.responses)
    kept += [(host, q) for q in np.flatnonzero(_informative(host.correct, g))]
    if len(kept) >= needed:
      break
  kept = kept[:needed]
  lengths = [len(h.responses[q * g + j]) for h, q in kept for j in range(g)]
  out.update(_ideals(lengths, rows, config))
  out["informative"] = len(kept)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--windows", type=int, default=4)
  parser.add_argument("--group", type=int, default=8, help="G")
  parser.add_argument("--prompts", type=int, default=16, help="informative groups per step")
  parser.add_argument("--max_oversample", type=int, default=2)
  parser.add_argument("--rows", type=int, default=32, help="rows B of the engine")
  parser.add_argument("--verify_every", type=int, default=8,
                      help="rollout.verify_every: decode steps between the engine's checks")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  config = demo_config.get_config("lte")
  config.method = "grpo"
  config.rollout.update(dict(prompts_per_step=args.prompts, batch_size=args.rows,
                             verify_every=args.verify_every))
  config.grpo.update(dict(group_size=args.group, dynamic_sampling=True,
                          max_oversample=args.max_oversample))
  config.eval.update(dict(at_start=False, at_end=False))
  config.verify.workers = 1
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  run = setup.build_run(config, tempfile.mkdtemp())
  params = run.params
  per = algorithms.family(config).examples_per_step(config)
  totals = {m: {} for m in ("in_engine", "regenerate")}
  started = time.perf_counter()
  for w in range(args.windows):
    idx = train.data_indices(config, len(run.train_data), w * per, per)
    examples = [run.train_data[i] for i in idx]
    key = algorithms.common.step_key(config, w)
    for name, fn in (("in_engine", in_engine), ("regenerate", regenerate)):
      r = fn(run, params, examples, args.group, args.prompts, key, args.rows, config)
      for k, v in r.items():
        totals[name][k] = totals[name].get(k, 0) + v
  for t in totals.values():
    for ideal in ("ideal", "oracle"):
      t[f"extra_over_{ideal}"] = t["decode_steps"] - t[f"{ideal}_steps"]
      t[f"extra_over_{ideal}_frac"] = t[f"extra_over_{ideal}"] / max(t[f"{ideal}_steps"], 1)
  run.close()
  result = {
      "bench": "dynamic_sampling", "task": "demo:lte (synthetic arithmetic, run to EOS)",
      "windows": args.windows, "group_size": args.group, "prompts": args.prompts,
      "max_oversample": args.max_oversample, "rows": args.rows,
      "verify_every": args.verify_every,
      "token_budget": config.rollout.token_budget, **totals,
      "seconds": round(time.perf_counter() - started, 1), "machine": platform.machine(),
      "load_avg": os.getloadavg()[0],
  }
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
