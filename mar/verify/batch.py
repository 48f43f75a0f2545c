"""Batched answer verification for training: a pool of worker processes.

Why processes: math-verify and sympy can run for seconds (or forever) on odd model
output, their timeouts need SIGALRM, which only works on a main thread, and the
trainer calls us from a JAX host-callback thread. So each check runs on the main
thread of a worker process under a SIGALRM deadline (`timeout`), and the parent
adds a hard deadline (`timeout + grace`): a worker that overruns it, dies or
exits is killed and replaced, and its item counts as wrong.

Workers are fresh interpreters (`python -c`, i.e. fork+exec like the 'spawn'
context, never a bare fork of the multi-threaded trainer), and unlike
multiprocessing's 'spawn' they do not re-import the trainer's `__main__` (which
would load JAX into every worker). Cheap rules run in the calling thread first
and identical (answer, gold) pairs are checked once, so only answers that need
sympy reach the pool.
"""

from __future__ import annotations

import collections
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Sequence

from absl import logging

from mar.verify import _worker
from mar.verify import equivalence
from mar.verify import extract
from mar.verify import normalize as norm

_MAR_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Worker:
  """One worker process and the parent's view of it."""

  def __init__(self, max_memory_mb: int):
    code = (
        f"import sys; sys.path.insert(0, {_MAR_ROOT!r}); "
        f"from mar.verify import _worker; _worker.main({int(max_memory_mb)})"
    )
    self.proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        close_fds=True,
        start_new_session=True,  # a Ctrl-C at the terminal is the trainer's to handle
    )
    self.fd = self.proc.stdout.fileno()
    self.buf = bytearray()
    self.ready = False
    self.started = time.monotonic()
    self.done = 0

  def send(self, data: bytes) -> bool:
    try:
      view = memoryview(data)
      fd = self.proc.stdin.fileno()
      while view:
        n = os.write(fd, view)
        view = view[n:]
      return True
    except (OSError, ValueError):
      return False

  def receive(self) -> list[tuple] | None:
    """Frames now readable (call after poll says so); None once the worker is gone."""
    try:
      data = os.read(self.fd, 1 << 16)
    except OSError:
      return None
    if not data:
      return None
    self.buf += data
    frames = []
    size = _worker._HEADER.size  # pylint: disable=protected-access
    while len(self.buf) >= size:
      (n,) = _worker._HEADER.unpack(self.buf[:size])  # pylint: disable=protected-access
      if len(self.buf) < size + n:
        break
      frames.append(pickle.loads(bytes(self.buf[size : size + n])))
      del self.buf[: size + n]
    return frames

  def kill(self) -> None:
    for stream in (self.proc.stdin, self.proc.stdout):
      try:
        stream.close()
      except OSError:
        pass
    try:
      self.proc.kill()
      self.proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
      pass


def _shutdown(workers: list[_Worker]) -> None:
  for w in workers:
    try:
      w.proc.stdin.close()  # a clean exit at end of stream
    except OSError:
      pass
  end = time.monotonic() + 1.0
  for w in workers:
    try:
      w.proc.wait(timeout=max(end - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      pass
    w.kill()


class BatchVerifier:
  """Verifies batches of model responses against gold answers in worker processes.

  Thread-safe (calls are serialised); usable from any thread. A response is
  correct iff its final answer (last box, else the last math expression or number;
  with `require_box` only the last closed box counts) is equivalent to the gold.
  """

  def __init__(
      self,
      num_workers: int = 2,
      timeout: float = equivalence.DEFAULT_TIMEOUT,
      *,
      require_box: bool = False,
      fast_path: bool = True,
      grace: float = 2.0,
      max_memory_mb: int = 4096,
      start_timeout: float = 120.0,
      max_items_per_worker: int = 50_000,
  ):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self.timeout = float(timeout)
    self.require_box = require_box
    self.fast_path = fast_path
    self._grace = grace
    self._max_memory_mb = max_memory_mb
    self._start_timeout = start_timeout
    self._max_items = max_items_per_worker
    self._lock = threading.RLock()
    self._next_id = 0
    self._closed = False
    self.stats = collections.Counter()  # items, fast, pool, soft_timeouts, timeouts, crashes, restarts
    self._workers = [_Worker(max_memory_mb) for _ in range(num_workers)]
    self._finalizer = weakref.finalize(self, _shutdown, self._workers)
    self._wait_until_ready()

  # -- public API ------------------------------------------------------------

  def verify(self, preds: Sequence[str], golds: Sequence[str]) -> list[bool]:
    """Whether each response's final answer equals its gold answer."""
    if len(preds) != len(golds):
      raise ValueError(f"verify: {len(preds)} predictions but {len(golds)} golds")
    pick = extract.extract_boxed if self.require_box else extract.extract_answer
    answers = []
    for p in preds:
      try:
        answers.append(pick(p) if isinstance(p, str) else None)
      except Exception:  # pylint: disable=broad-except
        answers.append(None)
    return self.match_answers(answers, golds)

  def match_answers(
      self,
      answers: Sequence[str | None],
      golds: Sequence[str | int | float],
      timeout: float | None = None,
  ) -> list[bool]:
    """Whether each already-extracted answer equals its gold (None is wrong)."""
    if len(answers) != len(golds):
      raise ValueError(f"match_answers: {len(answers)} answers but {len(golds)} golds")
    with self._lock:
      return self._match_answers(answers, golds, self.timeout if timeout is None else float(timeout))

  def _match_answers(
      self, answers: Sequence[str | None], golds: Sequence[str | int | float], timeout: float
  ) -> list[bool]:
    if self._closed:
      raise RuntimeError("BatchVerifier is closed")
    results = [False] * len(answers)
    todo: dict[tuple[str, str], list[int]] = {}
    for i, (a, g) in enumerate(zip(answers, golds)):
      self.stats["items"] += 1
      try:
        g = norm.prepare_gold(g)
        if not isinstance(a, str) or not isinstance(g, str):
          continue
        q = equivalence.quick_match(a, g) if self.fast_path else None
      except Exception:  # pylint: disable=broad-except
        q = None
      if q is not None:
        self.stats["fast"] += 1
        results[i] = q
        continue
      todo.setdefault((a, g), []).append(i)
    if todo:
      outs = self._run(list(todo), timeout)
      for idxs, ok in zip(todo.values(), outs):
        for i in idxs:
          results[i] = ok
    return results

  def close(self) -> None:
    with self._lock:
      self._closed = True
      self._finalizer()

  def __enter__(self) -> "BatchVerifier":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def worker_pids(self) -> list[int]:
    return [w.proc.pid for w in self._workers]

  # -- the pool --------------------------------------------------------------

  def _wait_until_ready(self) -> None:
    pending = [w for w in self._workers if not w.ready]
    end = time.monotonic() + self._start_timeout
    while pending and time.monotonic() < end:
      for w in self._poll(pending, end - time.monotonic()):
        frames = w.receive()
        if frames is None:
          raise RuntimeError(
              f"verifier worker {w.proc.pid} exited during start-up (exit code "
              f"{w.proc.poll()}); see its traceback above"
          )
        w.ready = w.ready or any(f[0] == "ready" for f in frames)
      pending = [w for w in pending if not w.ready]
    if pending:
      raise RuntimeError(f"verifier workers not ready after {self._start_timeout}s")

  @staticmethod
  def _poll(workers: list[_Worker], wait_s: float) -> list[_Worker]:
    """Workers with output (or EOF) within `wait_s` seconds."""
    if not workers:
      time.sleep(max(min(wait_s, 0.05), 0))
      return []
    poller = select.poll()  # not select(): trainer processes may hold fds above 1024
    for w in workers:
      poller.register(w.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    ready = {fd for fd, _ in poller.poll(max(wait_s, 0) * 1000)}
    return [w for w in workers if w.fd in ready]

  def _replace(self, w: _Worker) -> None:
    w.kill()
    self.stats["restarts"] += 1
    self._workers[self._workers.index(w)] = _Worker(self._max_memory_mb)

  def _run(self, pairs: list[tuple[str, str]], timeout: float) -> list[bool]:
    """Checks pairs in the pool; a pair whose worker overruns or dies is False."""
    with self._lock:
      if self._closed:
        raise RuntimeError("BatchVerifier is closed")
      out = [False] * len(pairs)
      pending = collections.deque(range(len(pairs)))
      inflight: dict[_Worker, tuple[int, int, float]] = {}  # worker -> (pair, id, deadline)
      hard = timeout + self._grace
      failed_starts = 0
      while pending or inflight:
        now = time.monotonic()
        for w in list(self._workers):
          if pending and w.ready and w not in inflight:
            i = pending.popleft()
            self._next_id += 1
            frame = _worker.encode_frame((self._next_id, pairs[i][0], pairs[i][1], timeout))
            if w.send(frame):
              inflight[w] = (i, self._next_id, now + hard)
              self.stats["pool"] += 1
            else:  # died while idle: retry the item elsewhere
              pending.appendleft(i)
              self._replace(w)
        waiting = [w for w in self._workers if w in inflight or not w.ready]
        ends = [d for _, _, d in inflight.values()]
        ends += [w.started + self._start_timeout for w in self._workers if not w.ready]
        wait_s = min(ends) - now if ends else 0.05
        for w in self._poll(waiting, wait_s):
          frames = w.receive()
          if frames is None:  # the worker died (crash, memory limit, killed)
            if w in inflight:
              i, _, _ = inflight.pop(w)
              self.stats["crashes"] += 1
              logging.warning("verifier worker %d died on an item; counted wrong", w.proc.pid)
            else:
              failed_starts += 1
            self._replace(w)
            continue
          for f in frames:
            if f[0] == "ready":
              w.ready = True
            elif w in inflight and f[0] == inflight[w][1]:
              out[inflight.pop(w)[0]] = bool(f[1])
              w.done += 1
              self.stats["soft_timeouts"] += bool(f[2])
        now = time.monotonic()
        for w, (i, _, d) in list(inflight.items()):
          if now > d:
            del inflight[w]
            self.stats["timeouts"] += 1
            logging.warning("verifier worker %d overran %.1fs; killed, item wrong", w.proc.pid, hard)
            self._replace(w)
        for w in list(self._workers):
          if not w.ready and now > w.started + self._start_timeout:
            failed_starts += 1
            self._replace(w)
          elif w.ready and w not in inflight and w.done >= self._max_items:
            self._replace(w)  # bounds memory growth of long-lived sympy caches
        if failed_starts > 3 * len(self._workers):
          logging.error("verifier workers fail to start; %d items counted wrong", len(pending))
          for w in list(inflight):
            self._replace(w)
          break
      return out


# `is_equivalent` lives beside the pool it uses off the main thread (equivalence stays below
# batch, so the worker process imports only equivalence).
_shared_lock = threading.Lock()
_shared_verifier = None


def _shared_pool():
  """One worker process for `is_equivalent` calls made off the main thread."""
  global _shared_verifier
  with _shared_lock:
    if _shared_verifier is None:
      _shared_verifier = BatchVerifier(num_workers=1)
    return _shared_verifier


def is_equivalent(pred: str, gold: str | int | float,
                  timeout: float = equivalence.DEFAULT_TIMEOUT) -> bool:
  """Whether `pred` answers `gold`; never raises, returns within ~`timeout` seconds.

  `pred` may be a bare answer, a `$...$` expression or a whole response (then the
  last box, else the last math expression or number, is the answer). `gold` is a
  dataset answer (LaTeX string or number).
  """
  try:
    answer = equivalence.prediction_answer(pred)
    gold_s = norm.prepare_gold(gold)
    if answer is None or not isinstance(gold_s, str):
      return False
    q = equivalence.quick_match(answer, gold_s)
    if q is not None:
      return q
    if threading.current_thread() is not threading.main_thread():
      return _shared_pool().match_answers([answer], [gold_s], timeout=timeout)[0]
    return equivalence.answers_match_within(answer, gold_s, timeout)
  except Exception:  # pylint: disable=broad-except
    return False
