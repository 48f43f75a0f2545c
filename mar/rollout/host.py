"""Host side of the rollout: the per-turn verification callback.

The rollout calls this once per turn for the whole batch (through `jax.pure_callback`).
It decodes each live row's attempt from its slots, extracts the final answer and checks it
against the gold answer looked up by example index. Verification runs in the verifier's
process pool, so a hanging or crashing check is a wrong answer, never a dead run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mar import verify


class AttemptVerifier:
  """Callable passed to `rollout` as `verify_fn` (a static argument: keep one per run).

  `answers` is the table of gold answers indexed by the rollout's `example_ids`; swap it
  (`set_answers`) to evaluate another benchmark without recompiling the rollout.
  """

  def __init__(self, tokenizer, verifier, answers: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.verifier = verifier
    self.answers = list(answers)
    self.calls = 0
    self.last_texts: list[str] = []

  def set_answers(self, answers: Sequence[str]) -> None:
    self.answers = list(answers)

  def attempt_texts(self, tokens, start, end, live) -> list[str]:
    return [
        self.tokenizer.decode(tokens[b, start[b]:end[b]].tolist()) if live[b] else ""
        for b in range(tokens.shape[0])
    ]

  def __call__(self, example_ids, tokens, start, end, live):
    self.calls += 1
    texts = self.attempt_texts(tokens, start, end, live)
    self.last_texts = texts
    rows = [b for b in range(len(texts)) if live[b]]
    correct = np.zeros(len(texts), bool)
    boxed = np.array([live[b] and verify.extract_boxed(t) is not None
                      for b, t in enumerate(texts)], bool)
    if rows:
      golds = [self.answers[int(example_ids[b])] for b in rows]
      results = self.verifier.verify([texts[b] for b in rows], golds)
      correct[rows] = np.asarray(results, bool)
    return correct & boxed, boxed
