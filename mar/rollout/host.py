"""Host side of the rollout: the per-turn verification callback.

The rollout calls this once per turn for the whole batch (through `jax.pure_callback`).
It decodes each live row's attempt from its slots, extracts the final answer and checks it
against the gold answer looked up by example index. Verification runs in the verifier's
process pool, so a hanging or crashing check is a wrong answer, never a dead run.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np

from mar import verify


class AttemptVerifier:
  """Callable passed to `rollout` as `verify_fn` (a static argument: keep one per run).

  `answers` is the table of gold answers indexed by the rollout's `example_ids`; swap it
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
    self.wrong_answers: list[list[str]] = []  # per row, this episode's wrong boxed answers
    self.episode_wrong: dict[int, list[str]] = {}  # the same per episode (continuous engine)
    # The continuous engine split over data shards calls back from each shard's thread.
    self._lock = threading.Lock()

  def set_answers(self, answers: Sequence[str]) -> None:
    self.answers = list(answers)

  def attempt_texts(self, tokens, start, end, live) -> list[str]:
    return [
        self.tokenizer.decode(tokens[b, start[b]:end[b]].tolist()) if live[b] else ""
        for b in range(tokens.shape[0])
    ]

  def __call__(self, example_ids, tokens, start, end, live, turn=0):
    """The rollout's per-turn callback: the device program waits for its result."""
    t0 = time.perf_counter()
    try:
      return self._verify(example_ids, tokens, start, end, live, turn)
    finally:
      self.stalled += time.perf_counter() - t0

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

  def _verify(self, example_ids, tokens, start, end, live, turn):
    self.calls += 1
    texts = self.attempt_texts(tokens, start, end, live)
    self.last_texts = texts
    if int(turn) == 0:
      self.wrong_answers = [[] for _ in texts]
    golds = [self.answers[int(i)] if live[b] else "" for b, i in enumerate(example_ids)]
    correct, boxed = self.verdicts(texts, golds, live)
    for b in np.flatnonzero(boxed & ~correct):
      self.wrong_answers[b].append(verify.extract_boxed(texts[b]))
    return correct, boxed

  def verify_rows(self, seq_ids, tokens, start, end, live, turns):
    """The continuous engine's check: rows of any turn, wrong answers kept per episode.

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

  def hint_feedback(self, attempts_left, go_on, width: int):
    """Hybrid feedback turns (multi-attempt feedback + LTE hint) as [B, width] ids + lengths.

    Drops the oldest answers until the text fits `width` tokens.
    """
    return self._hint_turns([self.wrong_answers[b] if go_on[b] else [] for b in range(len(go_on))],
                            attempts_left, go_on, width)

  def hint_feedback_rows(self, seq_ids, attempts_left, go_on, width: int):
    """`hint_feedback` for the continuous engine: wrong answers looked up by episode."""
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
