"""Shows one episode as a person reads it: the dialogue with its masks marked.

Prompt text is shown as is, each attempt (action tokens) under a header, and every
inserted feedback span between `[feedback>` and `<feedback]`, so a wrong mask is visible.
"""

from __future__ import annotations

import numpy as np

PROMPT, ACTION, FEEDBACK = "prompt", "action", "feedback"


def _segments(tokens, valid, action_mask, feedback_mask):
  """Consecutive runs of (kind, token ids) over the valid slots of one row."""
  segs: list[tuple[str, list[int]]] = []
  for tok, v, a, f in zip(tokens, valid, action_mask, feedback_mask):
    if not v:
      continue
    kind = ACTION if a else FEEDBACK if f else PROMPT
    if segs and segs[-1][0] == kind:
      segs[-1][1].append(int(tok))
    else:
      segs.append((kind, [int(tok)]))
  return segs


def render_episode(tokenizer, episodes, row: int) -> str:
  """The dialogue of `row` with attempt headers and feedback spans marked."""
  get = lambda x: np.asarray(x)[row]
  segs = _segments(get(episodes.tokens), get(episodes.valid), get(episodes.action_mask),
                   get(episodes.feedback_mask))
  out, attempt = [], 0
  correct = np.asarray(episodes.correct_turn)[:, row]
  for kind, ids in segs:
    text = tokenizer.decode(ids)
    if kind == ACTION:
      attempt += 1
      verdict = "correct" if attempt <= len(correct) and correct[attempt - 1] else "wrong"
      out.append(f"\n── attempt {attempt} ({len(ids)} tokens, {verdict}) ──\n{text}")
    elif kind == FEEDBACK:
      out.append(f"[feedback>{text}<feedback]")
    else:
      out.append(text)
  reward = float(np.asarray(episodes.reward)[row])
  out.append(f"\n── reward {reward:+.1f}, attempts used "
             f"{int(get(episodes.attempts_used))}/{int(get(episodes.n_attempts))} ──")
  return "".join(out)


def dialogue_text(tokenizer, episodes, row: int) -> str:
  """The plain transcript of `row` (all valid slots decoded, no markers)."""
  tokens, valid = np.asarray(episodes.tokens)[row], np.asarray(episodes.valid)[row]
  return tokenizer.decode([int(t) for t, v in zip(tokens, valid) if v])
