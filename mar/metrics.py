"""Training metrics on the host: JSONL + TensorBoard (+ W&B), progress bars, wall-clock splits.

`<workdir>/metrics.jsonl` holds one JSON object per logged step, `step` first. Values are
plain JSON: numpy/jax scalars become Python ints/floats, and non-finite floats (NaN, ±inf)
are written as `null`, so every line is strict JSON that any tool can read; TensorBoard
still receives the NaN/inf as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, Mapping

from absl import logging
import jax
import numpy as np

from mar import config_utils

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------ values


def to_python(value: Any, key: str = "value") -> Any:
    """A metric value as a plain JSON value (`config_utils.to_jsonable`); TypeError names `key`."""
    return config_utils.to_jsonable(value, f"metric {key!r}")


def _scalar_for_tensorboard(value: Any) -> float | None:
    """The float TensorBoard should plot, or None for non-scalars and strings."""
    if isinstance(value, (bool, str)) or value is None:
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
            return None
        return float(arr)
    if isinstance(value, (int, float)):
        return float(value)
    return None


# ------------------------------------------------------------------ JSONL


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All rows of a JSONL file ([] if it does not exist).

    A malformed line raises ValueError naming file and line, except a final line with
    no newline (a write cut short by a crash), which is skipped with a warning.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8") as f:
        lines = f.readlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not line.endswith("\n"):
                logging.warning("%s:%d: skipping a partial last line (%s)", path, i, e)
                continue
            raise ValueError(f"{path}:{i}: not a JSON object: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows


def _drop_partial_last_line(path: str) -> None:
    """Cuts a final line left without its newline by a crash, so appends start clean."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        logging.warning("%s: dropping a partial last line: %r", path, data[cut:][:200])
        f.truncate(cut)


class MetricsWriter:
    """Appends metric rows to `<workdir>/metrics.jsonl` and scalars to TensorBoard events.

    Only process 0 of a multi-host run writes (others get a no-op writer), and only if
    `enabled`. Each `write` is flushed, so a crash loses at most the row being written.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, wandb_sink=None):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.enabled = bool(enabled) and jax.process_index() == 0
        self._tb = None
        self._file = None
        self._wandb = wandb_sink if self.enabled else None
        if self.enabled:
            os.makedirs(self.workdir, exist_ok=True)
            _drop_partial_last_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")

    @classmethod
    def from_config(cls, workdir: str | os.PathLike, config: Any) -> "MetricsWriter":
        """A writer that also sends its scalars to W&B when `config.metrics.wandb` is on."""
        sink = None
        m = config.metrics
        if m.get("wandb") and jax.process_index() == 0:
            from mar.wandb_sink import WandbSink  # pylint: disable=g-import-not-at-top

            sink = WandbSink(os.fspath(workdir), config_utils.config_to_dict(config),
                             project=m.wandb_project, entity=m.wandb_entity,
                             read_rows=read_jsonl)
        return cls(workdir, wandb_sink=sink)

    def _tensorboard(self, purge_step: int | None = None):
        if self._tb is None:
            from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

            self._tb = SummaryWriter(logdir=self.workdir, purge_step=purge_step, flush_secs=30)
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Logs `metrics` at `step`; returns the row as written (also when disabled)."""
        step = int(step)
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("metric name 'step' is reserved for the step number")
            row[str(key)] = to_python(value, str(key))
        if not self.enabled:
            return row
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        tb = self._tensorboard()
        scalars = {}
        for key, value in metrics.items():
            scalar = _scalar_for_tensorboard(value)
            if scalar is not None:
                tb.add_scalar(str(key), scalar, global_step=step)
                scalars[str(key)] = scalar
        if self._wandb is not None:
            self._wandb.log(step, scalars)
        return row

    def truncate_after(self, step: int) -> int:
        """Drops rows with `step` greater than the given one; returns how many were dropped.

        Call when resuming from the checkpoint at `step`, so the rerun of later steps does
        not leave duplicate rows. TensorBoard is told to purge events after `step` too.
        """
        if not self.enabled:
            return 0
        self._file.close()
        rows = read_jsonl(self.path)
        keep = [r for r in rows if int(r.get("step", -1)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tensorboard(purge_step=step + 1)
        return len(rows) - len(keep)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------ progress


def progress_enabled(stream=None) -> bool:
    """Bars only on an interactive terminal, and not when MAR_NO_PROGRESS=1."""
    if os.environ.get("MAR_NO_PROGRESS", "0") not in ("", "0"):
        return False
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """A tqdm bar on a terminal; otherwise an absl log line every `log_every` items.

    Iterate it (when built from an iterable) or call `update(n)` (when built from a total).
    `set_postfix(**metrics)` shows metrics on the bar and appends them to the log lines.
    """

    def __init__(
        self,
        iterable_or_total: Iterable | int | None,
        desc: str = "",
        log_every: int = 100,
        unit: str = "it",
        initial: int = 0,
        enabled: bool | None = None,
    ):
        if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
            self._iterable, self.total = None, iterable_or_total
        else:
            self._iterable = iterable_or_total
            self.total = len(iterable_or_total) if hasattr(iterable_or_total, "__len__") else None
        self.desc, self.unit, self.log_every = desc, unit, max(1, int(log_every))
        self.n = int(initial)
        self._start_n, self._start = self.n, time.perf_counter()
        self._postfix: dict[str, Any] = {}
        self._bar = None
        if progress_enabled() if enabled is None else enabled:
            from tqdm import tqdm  # pylint: disable=g-import-not-at-top

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, initial=self.n, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        """Items per second since the bar was made."""
        elapsed = time.perf_counter() - self._start
        return (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.n // self.log_every > before // self.log_every or (self.total and self.n == self.total):
            logging.info("%s", self.log_line())

    def log_line(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self._postfix.items())
        rate = f"{self.rate:.3g} {self.unit}/s"
        return f"{self.desc or 'progress'}: {self.n}{total} {self.unit} ({rate}){extra}"

    def set_postfix(self, **metrics: Any) -> None:
        self._postfix = dict(metrics)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)

    def __iter__(self) -> Iterator:
        if self._iterable is None:
            raise TypeError("Progress built from a total is not iterable; call update()")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(
    iterable_or_total: Iterable | int | None, desc: str = "", log_every: int = 100, **kwargs: Any
) -> Progress:
    """`Progress(...)`: a bar with rates on a TTY, periodic absl lines in CI logs."""
    return Progress(iterable_or_total, desc=desc, log_every=log_every, **kwargs)


def _fmt(v: Any) -> str:
    v = to_python(v) if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------ timing


@contextlib.contextmanager
def timed(name: str, times: dict[str, float]) -> Iterator[None]:
    """Adds the wall seconds of the block to `times[name]`.

    JAX dispatch is async: block on the block's outputs (`jax.block_until_ready`) inside
    it, or the time lands in whichever later block first waits for them.
    """
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


class Timer:
    """Named wall-clock splits: `with timer("sample"): ...`; `timer.metrics()` for logging.

    Also a plain stopwatch: `with Timer() as t: ...` then `t.elapsed` (seconds).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.elapsed = 0.0
        self._start = None

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self._start

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return timed(name, self.seconds)

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """Splits as `{prefix+name: seconds}`, plus `{prefix}total`."""
        out = {f"{prefix}{k}": v for k, v in self.seconds.items()}
        out[f"{prefix}total"] = sum(self.seconds.values())
        return out

    def reset(self) -> None:
        self.seconds = {}
