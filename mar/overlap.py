"""When was the device busy? The measure behind a step's host critical-path share.

JAX dispatch is asynchronous: a jitted call returns at once and the device works through
its queue while the host goes on. `DeviceTimeline` records, for every piece of device work
the trainer dispatches, the interval in which it ran: a watcher thread waits on each result
in dispatch order (the device runs its queue in that order, so a result's work starts when
it was dispatched or when the previous one finished, whichever is later).

  host critical time = step wall time - union of the busy intervals

is the time the device sat idle waiting for the host (verification, hints, packing).
"""

from __future__ import annotations

import queue
import threading
import time

import jax


class DeviceTimeline:
  """Busy intervals of the device, from dispatch order and a watcher thread."""

  def __init__(self):
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._intervals: list[tuple[float, float]] = []
    self._last_done = 0.0
    self._thread = threading.Thread(target=self._watch, daemon=True, name="device-timeline")
    self._thread.start()

  def track(self, tree, dispatched_at: float | None = None):
    """Registers device work whose results are `tree` (dispatched now, or at the given time)."""
    self._queue.put((time.perf_counter() if dispatched_at is None else dispatched_at, tree))
    return tree

  def call(self, fn, *args, **kwargs):
    """fn(*args, **kwargs), its results tracked as device work dispatched by this call."""
    start = time.perf_counter()
    return self.track(fn(*args, **kwargs), start)

  def busy_seconds(self, since: float = 0.0) -> float:
    """Length of the union of busy intervals after `since` (waits for tracked work)."""
    self._queue.join()
    with self._lock:
      spans = sorted((max(a, since), b) for a, b in self._intervals if b > since)
    total, end = 0.0, since
    for a, b in spans:
      if b > end:
        total += b - max(a, end)
        end = b
    return total

  def forget_before(self, t: float) -> None:
    with self._lock:
      self._intervals = [(a, b) for a, b in self._intervals if b > t]

  def _add(self, start: float, end: float) -> None:
    with self._lock:
      self._intervals.append((start, end))

  def _watch(self) -> None:
    while True:
      dispatched_at, tree = self._queue.get()
      try:
        jax.block_until_ready(tree)
      except Exception:  # pylint: disable=broad-except
        pass  # the caller sees the error when it reads the result
      done = time.perf_counter()
      self._add(max(dispatched_at, self._last_done), done)
      self._last_done = done
      del tree
      self._queue.task_done()


def host_critical(wall: float, busy: float, stalled: float = 0.0) -> dict:
  """Step metrics: seconds and share of `wall` in which the device waited for the host.

  `stalled` is host work done while a device program was blocked on it (verification
  callbacks inside the multi-attempt rollout): busy by the timeline, but host time.
  """
  crit = min(wall, max(0.0, wall - busy + stalled))
  return {"time/host_critical": crit, "time/host_fraction": crit / wall if wall > 0 else 0.0}
