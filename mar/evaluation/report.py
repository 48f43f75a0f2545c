"""Evaluation results as rows of `<workdir>/eval.jsonl`, and the table printed from them.

Two row shapes, with exactly these keys (a contract with plots and notebooks):

* attempt curve: `{"step", "benchmark", "attempts", "accuracy", "n"}` — greedy accuracy
  when the prompt allows `attempts` attempts (a separate run per value, METHODS.md §1);
* metric rows: `{"step", "benchmark", "metric", "k", "value", "n"}` with `metric` one of
  `"pass@k"` (Pass@k from n samples per problem), `"sampled_attempts"` (accuracy with `k`
  attempts, the mean over `eval.attempt_samples` sampled episodes per problem at the eval
  temperature: the low-variance twin of the greedy curve) and `"expected_accuracy"` (k = 1:
  the exact probability, by teacher forcing, that a response at T = 1 opens with the
  canonical correct answer; `eval/expected_accuracy` in metrics.jsonl).

`accuracy` and `value` are fractions in [0, 1]; `n` is the number of problems scored.
The printed table shows percent. A later row for the same (step, benchmark, column)
replaces an earlier one, so a rerun evaluation can simply append.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Sequence

import jax

from mar.metrics import read_jsonl

EVAL_FILE = "eval.jsonl"
ATTEMPT_KEYS = frozenset({"step", "benchmark", "attempts", "accuracy", "n"})
PASSK_KEYS = frozenset({"step", "benchmark", "metric", "k", "value", "n"})
PASSK_METRIC = "pass@k"
SAMPLED_ATTEMPTS = "sampled_attempts"
EXPECTED_ACCURACY = "expected_accuracy"
METRICS = (PASSK_METRIC, SAMPLED_ATTEMPTS, EXPECTED_ACCURACY)
AVERAGE = "average"


def eval_path(workdir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(workdir), EVAL_FILE)


def attempt_row(step: int, benchmark: str, attempts: int, accuracy: float, n: int) -> dict:
    """Accuracy (fraction) on `benchmark` with `attempts` attempts allowed, over n problems."""
    row = {"step": int(step), "benchmark": str(benchmark), "attempts": int(attempts),
           "accuracy": float(accuracy), "n": int(n)}
    validate_row(row)
    return row


def passk_row(step: int, benchmark: str, k: int, value: float, n: int) -> dict:
    """Mean pass@k (fraction) on `benchmark` over n problems."""
    return metric_row(step, benchmark, PASSK_METRIC, k, value, n)


def metric_row(step: int, benchmark: str, metric: str, k: int, value: float, n: int) -> dict:
    """A metric row (one of METRICS; fraction) on `benchmark` over n problems."""
    row = {"step": int(step), "benchmark": str(benchmark), "metric": str(metric), "k": int(k),
           "value": float(value), "n": int(n)}
    validate_row(row)
    return row


def row_kind(row: dict) -> str:
    """'attempts' or the row's metric (one of METRICS); raises ValueError for anything else."""
    keys = set(row)
    if keys == ATTEMPT_KEYS:
        return "attempts"
    if keys == PASSK_KEYS and row.get("metric") in METRICS:
        return row["metric"]
    raise ValueError(
        f"eval row keys {sorted(keys)}: expected {sorted(ATTEMPT_KEYS)} or {sorted(PASSK_KEYS)}"
        f" with metric one of {METRICS}"
    )


def validate_row(row: dict) -> None:
    """Checks key set, types and ranges; raises ValueError saying which field is wrong."""
    kind = row_kind(row)
    value_key, count_key = ("accuracy", "attempts") if kind == "attempts" else ("value", "k")
    for key in ("step", "n", count_key):
        if not isinstance(row[key], int) or isinstance(row[key], bool):
            raise ValueError(f"eval row field {key!r}: expected int, found {row[key]!r}")
    if row[count_key] < 1 or row["n"] < 0 or row["step"] < 0:
        raise ValueError(f"eval row {row}: expected {count_key} >= 1, n >= 0, step >= 0")
    value = row[value_key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"eval row field {value_key!r}: expected a fraction in [0, 1], found {value!r}")
    if not isinstance(row["benchmark"], str) or not row["benchmark"]:
        raise ValueError(f"eval row field 'benchmark': expected a name, found {row['benchmark']!r}")


def append_eval_rows(workdir: str | os.PathLike, rows: Iterable[dict]) -> str:
    """Validates and appends rows to `<workdir>/eval.jsonl` (process 0 only); returns the path."""
    rows = list(rows)
    for row in rows:
        validate_row(row)
    path = eval_path(workdir)
    if jax.process_index() != 0 or not rows:
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
    return path


def read_eval_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of an eval.jsonl (a workdir is accepted too); a bad row names file and line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = eval_path(path)
    rows = read_jsonl(path)
    for i, row in enumerate(rows, start=1):
        try:
            validate_row(row)
        except ValueError as e:
            raise ValueError(f"{path}: row {i}: {e}") from e
    return rows


def steps_of(rows: Sequence[dict]) -> list[int]:
    return sorted({int(r["step"]) for r in rows})


_HEADERS = {SAMPLED_ATTEMPTS: (1, "s-att@{k}"), EXPECTED_ACCURACY: (2, "E[acc]"),
            PASSK_METRIC: (3, "pass@{k}")}


def _column(row: dict) -> tuple[int, int, str]:
    """Sort key and header: greedy attempt columns (by attempts), sampled attempt columns,
    the expected accuracy, then pass@k (by k)."""
    kind = row_kind(row)
    if kind == "attempts":
        return (0, row["attempts"], f"att@{row['attempts']}")
    order, header = _HEADERS[kind]
    return (order, row["k"], header.format(k=row["k"]))


@dataclasses.dataclass
class EvalTable:
    """Results of one step: `values[(benchmark or "average", header)]` is a fraction."""

    step: int
    benchmarks: list[str]  # first-seen order
    headers: list[str]  # att@1, att@2, ..., pass@1, pass@16
    values: dict[tuple[str, str], float]
    ns: dict[str, list[int]]  # distinct n per benchmark


def eval_table(rows: Sequence[dict], step: int) -> EvalTable:
    """Collects the rows of `step`; later rows win; adds the average where all benchmarks have a value."""
    benchmarks: list[str] = []
    columns: set[tuple[int, int, str]] = set()
    values: dict[tuple[str, str], float] = {}
    ns: dict[str, list[int]] = {}
    for row in rows:
        if int(row["step"]) != step:
            continue
        b = row["benchmark"]
        if b not in benchmarks:
            benchmarks.append(b)
        col = _column(row)
        columns.add(col)
        values[(b, col[2])] = row["accuracy"] if col[0] == 0 else row["value"]
        if row["n"] not in ns.setdefault(b, []):
            ns[b].append(row["n"])
    headers = [c[2] for c in sorted(columns)]
    for h in headers:
        per_bench = [values.get((b, h)) for b in benchmarks]
        if all(v is not None for v in per_bench):
            values[(AVERAGE, h)] = sum(per_bench) / len(per_bench)
    return EvalTable(step, benchmarks, headers, values, ns)


def format_table(rows: Sequence[dict], step: int | None = None) -> str:
    """A per-benchmark table at `step` (default: the latest), percent, with an average row.

    Columns: `att@k` = greedy accuracy with k attempts allowed, `s-att@k` the same sampled
    (mean over episodes), `E[acc]` the expected accuracy, `pass@k`. The average is the
    unweighted mean over benchmarks (as both papers report it), shown only when every
    benchmark has that column.
    """
    if not rows:
        return "no eval rows"
    if step is None:
        step = steps_of(rows)[-1]
    table = eval_table(rows, step)
    if not table.benchmarks:
        return f"no eval rows at step {step} (steps: {steps_of(rows)})"
    headers = ["benchmark", "n"] + table.headers
    body = [
        [b, "/".join(str(x) for x in table.ns.get(b, []))]
        + [_pct(table.values.get((b, h))) for h in table.headers]
        for b in table.benchmarks + [AVERAGE]
    ]
    widths = [max(len(r[i]) for r in [headers] + body) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    title = f"eval at step {step}: att@k = accuracy (%) with k attempts, pass@k (%)"
    rule = "-" * len(line(headers))
    return "\n".join(
        [title, line(headers), rule] + [line(r) for r in body[:-1]] + [rule, line(body[-1])]
    )


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * value:.1f}"
