"""Worker process of `BatchVerifier`: reads (id, answer, gold, timeout), writes (id, ok, timed_out).

Started as a fresh interpreter (`python -c ...`), never forked from the trainer.
Frames on stdin/stdout are a 4-byte big-endian length and a pickle. The check runs
on this process's main thread, so its deadline can use SIGALRM; the parent holds a
hard deadline on top and kills this process if even that is not enough.
"""

from __future__ import annotations

import os
import pickle
import resource
import struct
import sys
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> Any | None:
  """One pickled frame, or None at end of stream."""
  header = stream.read(_HEADER.size)
  if len(header) < _HEADER.size:
    return None
  (size,) = _HEADER.unpack(header)
  data = stream.read(size)
  if len(data) < size:
    return None
  return pickle.loads(data)


def encode_frame(obj: Any) -> bytes:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  return _HEADER.pack(len(data)) + data


def _limit_memory(max_memory_mb: int) -> None:
  if max_memory_mb > 0:
    limit = max_memory_mb * 1024 * 1024
    try:
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
      pass


def main(max_memory_mb: int = 0) -> None:
  # Keep a private copy of stdout for frames; anything printed goes to stderr.
  out = os.fdopen(os.dup(1), "wb", buffering=0)
  os.dup2(2, 1)
  inp = sys.stdin.buffer
  _limit_memory(max_memory_mb)

  from mar.verify import equivalence  # pylint: disable=g-import-not-at-top

  equivalence.warm_up()  # imports sympy / math-verify before we say "ready"
  try:
    out.write(encode_frame(("ready", os.getpid())))
    while True:
      frame = read_frame(inp)
      if frame is None:
        return  # the parent closed our stdin (or died)
      req_id, answer, gold, timeout = frame
      ok, timed_out = equivalence.check_within(answer, gold, timeout)
      out.write(encode_frame((req_id, bool(ok), timed_out)))
  except BrokenPipeError:
    return


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
