"""Throughput of BatchVerifier on model-like responses; prints JSON.

Responses are MATH-500 solutions (their last box is the answer) checked against
their own gold (right) and against another problem's gold (wrong), plus the same
solutions with the box rewritten to an equivalent but different form, so that
they need sympy. Two measurements: the realistic mix (cheap rules first, the
pool for the rest) and the pool alone (`fast_path=False`); each on fresh workers
(cold) and then on the same workers with the other half of the problems (warm:
sympy and math-verify's parser caches filled, as in a long training run).

  python -m bench.verify --data_dir=/path/to/shared/data --num_workers=2
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags

from mar.data import datasets
from mar.verify import BatchVerifier
from mar.verify import extract

_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    "Folder with benchmarks/math500/test.jsonl.",
)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Verifier worker processes.")
_TIMEOUT = flags.DEFINE_float("timeout", 3.0, "Per-item deadline in seconds.")


def _responses(data_dir: str) -> tuple[list[str], list[str], list[bool]]:
  """(responses, golds, expected) built from the MATH-500 solutions."""
  path = datasets.benchmark_path("math500", data_dir)
  solutions = [r["solution"] for _, r in datasets.read_jsonl(path)]
  golds = [ex.answer for ex in datasets.load_benchmark("math500", data_dir)]
  preds, gs, want = [], [], []
  n = len(golds)
  for i, sol in enumerate(solutions):
    box = extract.extract_boxed(sol)
    preds.append(sol)  # right, usually decided by the cheap rules
    gs.append(golds[i])
    want.append(True)
    preds.append(sol)  # wrong: another problem's gold
    gs.append(golds[(i + 7) % n])
    want.append(golds[(i + 7) % n] == golds[i])
    # Right but written differently (scalar answers): needs sympy, not the cheap rules.
    if not any(t in box for t in (",", "=", "\\text", "\\begin", "^\\circ", "\\$", "\\mbox", "_", "\\pm")):
      preds.append(sol.replace(f"\\boxed{{{box}}}", f"\\boxed{{\\frac{{4 \\cdot {{{box}}}}}{{4}}}}"))
      gs.append(golds[i])
      want.append(True)
  return preds, gs, want


def _measure(fast: bool, batches: list[tuple[list[str], list[str], list[bool]]]) -> list[dict]:
  """Verifies the batches in order with one verifier (its workers warm up on the first)."""
  out = []
  with BatchVerifier(num_workers=_NUM_WORKERS.value, timeout=_TIMEOUT.value, fast_path=fast) as v:
    for preds, golds, want in batches:
      before = dict(v.stats)
      start = time.perf_counter()
      got = v.verify(preds, golds)
      seconds = time.perf_counter() - start
      d = {k: v.stats[k] - before.get(k, 0) for k in v.stats}
      out.append({
          "responses": len(preds),
          "seconds": round(seconds, 3),
          "answers_per_s": round(len(preds) / seconds, 1),
          "agreement_with_expected": round(sum(g == w for g, w in zip(got, want)) / len(want), 4),
          "share_decided_by_cheap_rules": round(d.get("fast", 0) / max(d.get("items", 1), 1), 3),
          "pool_items": d.get("pool", 0),
          "soft_timeouts": d.get("soft_timeouts", 0),
          "hard_timeouts": d.get("timeouts", 0),
      })
  return out


def main(argv: list[str]) -> None:
  del argv
  preds, golds, want = _responses(_DATA_DIR.value)
  half = len(preds) // 2
  batches = [(preds[:half], golds[:half], want[:half]), (preds[half:], golds[half:], want[half:])]
  result = {
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
      "num_workers": _NUM_WORKERS.value,
      "timeout_s": _TIMEOUT.value,
      "note": "cold = fresh workers; warm = the same workers on new problems",
  }
  for name, fast in (("mixed", True), ("pool_only", False)):
    cold, warm = _measure(fast, batches)
    result[name] = {"cold": cold, "warm": warm}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
