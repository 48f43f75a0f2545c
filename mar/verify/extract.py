"""Final-answer extraction from model responses: boxes, math segments, numbers.

Everything here is linear in the length of the text (no regex that can backtrack
badly), so the trainer's host thread can call it on arbitrary model output without
a deadline.
"""

from __future__ import annotations

import re

# Openers whose braced argument is a final answer. The last one in the text wins.
_BOX_OPENERS = ("\\boxed", "\\fbox")
# A number: integer, decimal (".5" too), with thousands separators or a decimal comma
# (`2,75`; normalize.decimal_comma decides later whether `1,000` is a thousand), or a
# plain fraction read whole (`2/3`, as Math-Verify does; not its denominator `3`).
_NUMBER_RE = re.compile(
    r"-?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+,\d+(?![\d,])|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+"
)
_BRACE_RE = re.compile(r"[{}]")
_DOLLAR_RE = re.compile(r"(?<!\\)\$\$?")
# Minerva's closing line: "Final Answer: The final answer is $X$. I hope it is correct."
_FINAL_ANSWER_RE = re.compile(r"final answer is\s*(?<!\\)\$(?!\$)", re.IGNORECASE)
# Inline math whose content sits on its own line (`$\n 9 \n$`, `\(\n 9 \n\)`): graders
# (Math-Verify) do not read inline delimiters across lines, so this is not an answer.
_OWN_LINE_INLINE_RE = re.compile(
    r"(?<![\\$])\$(?!\$)[ \t]*\n[^$]*\n[ \t]*(?<!\\)\$(?!\$)"
    r"|\\\([ \t]*\n(?:[^\\]|\\(?![()]))*\n[ \t]*\\\)"  # stops at the next \( or \): linear
)
# Fallback extraction only looks at the end of a response (bounds the work).
_FALLBACK_TAIL_CHARS = 4000


def _match_brace(text: str, open_pos: int) -> int:
  """Index just past the `}` matching the `{` at `open_pos`, or -1 when unclosed.

  Raw `{` / `}` characters are counted, as the Qwen2.5-Math grader and the
  rollout's on-device stop check do; `\\{1, 2\\}` is balanced either way.
  """
  depth = 0
  for m in _BRACE_RE.finditer(text, open_pos):
    if m.group() == "{":
      depth += 1
    else:
      depth -= 1
      if depth == 0:
        return m.end()
  return -1


def _last_box_span(text: str) -> tuple[int, int] | None:
  """(start, end) of the content of the last box opener, None when it is unclosed."""
  start = -1
  opener = ""
  for op in _BOX_OPENERS:
    pos = text.rfind(op + "{")
    # Also accept `\boxed {` (a space before the brace).
    pos_sp = text.rfind(op + " {")
    if pos_sp > pos:
      pos = pos_sp
    if pos > start:
      start, opener = pos, op
  if start < 0:
    return None
  brace = text.index("{", start + len(opener))
  end = _match_brace(text, brace)
  if end < 0:
    return None
  return brace + 1, end - 1


def extract_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces kept.

  Returns None when the text has no box or when its last box is not closed (a
  truncated answer): a grader must not read an unfinished box.
  """
  if not isinstance(text, str):
    return None
  span = _last_box_span(text)
  if span is None:
    return None
  return text[span[0] : span[1]]


def has_closed_box(text: str) -> bool:
  """Whether the last box opener in `text` is closed (the attempt gave an answer)."""
  return isinstance(text, str) and _last_box_span(text) is not None


def final_answer_statement(text: str) -> tuple[int, int] | None:
  """(start, end) of X in the last closed Minerva-style "final answer is $X$", else None."""
  if not isinstance(text, str):
    return None
  last = None
  for last in _FINAL_ANSWER_RE.finditer(text):
    pass
  if last is None:
    return None
  close = _DOLLAR_RE.search(text, last.end())
  if close is None:
    return None  # unfinished: no answer stated
  return last.end(), close.start()


def extract_final(text: str) -> str | None:
  """The response's last answer statement: its last closed box or, when it comes later, a
  Minerva "The final answer is $X$. I hope it is correct." (the papers' graders read X).

  None when there is neither.
  """
  if not isinstance(text, str):
    return None
  span = _last_box_span(text)
  statement = final_answer_statement(text)
  if statement is not None and (span is None or span[1] < statement[0]):
    return text[statement[0] : statement[1]].strip()  # no box in or after the statement
  if span is None:
    return None
  return text[span[0] : span[1]]


def _mask_own_line_inline(text: str) -> str:
  """`text` with inline math whose content sits on its own line blanked out (same length)."""
  return _OWN_LINE_INLINE_RE.sub(lambda m: " " * len(m.group()), text)


def _last_math_segment(text: str) -> tuple[int, str] | None:
  """(end position, content) of the last `$..$`, `$$..$$`, `\\(..\\)` or `\\[..\\]`."""
  best: tuple[int, str] | None = None
  for open_, close in (("\\(", "\\)"), ("\\[", "\\]")):
    e = text.rfind(close)
    if e < 0:
      continue
    s = text.rfind(open_, 0, e)
    if s < 0:
      continue
    if best is None or e + 2 > best[0]:
      best = (e + 2, text[s + 2 : e])
  # Dollars: the last two unescaped `$` / `$$` delimiters enclose the segment.
  delims = [m.span() for m in _DOLLAR_RE.finditer(text)]
  if len(delims) >= 2:
    content = text[delims[-2][1] : delims[-1][0]]
    end = delims[-1][1]
    if content.strip() and (best is None or end > best[0]):
      best = (end, content)
  return best


def extract_answer(response: str) -> str | None:
  """The final answer of a response, as graders read it.

  The last answer statement (`extract_final`: last closed box, or a later Minerva
  final-answer phrase); otherwise whichever comes last of the last math segment
  (`$...$`, `\\(...\\)`, `\\[...\\]`) and the last number (`2/3` whole), where inline math
  split over lines does not count. None when there is neither (or the input is not a
  string).
  """
  if not isinstance(response, str):
    return None
  final = extract_final(response)
  if final is not None:
    return final.strip()
  tail = _mask_own_line_inline(response[-_FALLBACK_TAIL_CHARS:])
  segment = _last_math_segment(tail)
  seg_end = segment[0] if segment else 0
  last_number = None
  for m in _NUMBER_RE.finditer(tail, seg_end):
    last_number = m.group(0)
  if last_number is not None:
    return last_number
  if segment is not None:
    return segment[1].strip()
  return None
