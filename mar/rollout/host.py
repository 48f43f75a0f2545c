"""Host side of the rollout: the engine's verification callback.

The engine calls `verify_rows` every `rollout.verify_every` decode steps for all rows
waiting on a verdict (through `jax.pure_callback`). It decodes each row's attempt from its
slots, extracts the final answer and checks it against the gold answer looked up by episode
index. Verification runs in the verifier's process pool, so a hanging or crashing check is
a wrong answer, never a dead run.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np

from mar import verify


class AttemptVerifier:
  """The engine's verifier (a static argument of its program: keep one per run).

  `answers` is the table of gold answers indexed by the queue's episode ids; swap it
  (`set_answers`) to evaluate another benchmark without recompiling the rollout.
  `feedback_text(attempts_left, wrong_answers)` writes a hybrid feedback turn
  (`rollout.hint_feedback_len > 0`); the caller supplies it (setup: LTE's
  `hints.hint_feedback_text`), so the engine knows no method's prompts.
  """

  def __init__(self, tokenizer, verifier, answers: Sequence[str] = (),
               feedback_text: Callable[[int, Sequence[str]], str] | None = None):
    self.tokenizer = tokenizer
    self.feedback_text = feedback_text
    self.verifier = verifier
    self.answers = list(answers)
    self.calls = 0
    self.seconds = 0.0  # host time spent verifying, in callbacks or not (time/verify)
    self.stalled = 0.0  # the part of it spent inside callbacks, with the device blocked
    self.last_texts: list[str] = []
    self.episode_wrong: dict[int, list[str]] = {}  # per episode, its wrong boxed answers
    # The engine split over data shards calls back from each shard's thread.
    self._lock = threading.Lock()

  def set_answers(self, answers: Sequence[str]) -> None:
    self.answers = list(answers)

  def attempt_texts(self, tokens, start, end, live) -> list[str]:
    return [
        self.tokenizer.decode(tokens[b, start[b]:end[b]].tolist()) if live[b] else ""
        for b in range(tokens.shape[0])
    ]

  def take_seconds(self) -> tuple[float, float]:
    """(verification seconds, of which inside callbacks) since the last call."""
    out = (self.seconds, self.stalled)
    self.seconds = self.stalled = 0.0
    return out

  def verdicts(self, texts: Sequence[str], golds: Sequence[str], live) -> tuple[np.ndarray, ...]:
    """(correct, boxed) per row: correct needs a closed box whose answer matches the gold."""
    t0 = time.perf_counter()
    rows = [b for b in range(len(texts)) if live[b]]
    correct = np.zeros(len(texts), bool)
    boxed = np.array([bool(live[b]) and verify.extract_boxed(t) is not None
                      for b, t in enumerate(texts)], bool)
    if rows:
      results = self.verifier.verify([texts[b] for b in rows], [golds[b] for b in rows])
      correct[rows] = np.asarray(results, bool)
    self.seconds += time.perf_counter() - t0
    return correct & boxed, boxed

  def verify_rows(self, seq_ids, tokens, start, end, live, turns):
    """The engine's check: rows of any turn, wrong answers kept per episode.

    seq_ids [B] index `answers`; turns [B] is each row's 0-based attempt.
    """
    with self._lock:
      t0 = time.perf_counter()
      try:
        self.calls += 1
        texts = self.attempt_texts(tokens, start, end, live)
        self.last_texts = texts
        golds = [self.answers[int(i)] if live[b] else "" for b, i in enumerate(seq_ids)]
        correct, boxed = self.verdicts(texts, golds, live)
        for b in np.flatnonzero(live):
          wrong = self.episode_wrong.setdefault(int(seq_ids[b]), [])
          if int(turns[b]) == 0:
            wrong.clear()
          if boxed[b] and not correct[b]:
            wrong.append(verify.extract_boxed(texts[b]))
        return correct, boxed
      finally:
        self.stalled += time.perf_counter() - t0

  def hint_feedback_rows(self, seq_ids, attempts_left, go_on, width: int):
    """Hybrid feedback turns (multi-attempt feedback + the wrong answers so far, LTE's hint)
    as [B, width] ids + lengths, wrong answers looked up by episode; the oldest answers are
    dropped until the text fits `width` tokens."""
    with self._lock:
      t0 = time.perf_counter()
      try:
        answers = [self.episode_wrong.get(int(seq_ids[b]), []) if go_on[b] else []
                   for b in range(len(go_on))]
        return self._hint_turns(answers, attempts_left, go_on, width)
      finally:
        self.stalled += time.perf_counter() - t0

  def _hint_turns(self, wrong_answers, attempts_left, go_on, width: int):
    if self.feedback_text is None:
      raise ValueError("hybrid feedback turns (hint_feedback_len > 0) need the verifier's "
                       "feedback_text")
    tokens = np.full((len(go_on), width), self.tokenizer.pad_id, np.int32)
    lengths = np.zeros(len(go_on), np.int32)
    for b in np.flatnonzero(go_on):
      answers = list(wrong_answers[b])
      while True:
        ids = self.tokenizer.encode(self.feedback_text(int(attempts_left[b]), answers))
        if len(ids) <= width or not answers:
          break
        answers = answers[1:]
      ids = ids[:width]
      tokens[b, :len(ids)], lengths[b] = ids, len(ids)
    return tokens, lengths
