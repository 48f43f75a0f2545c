"""Answer normalisation and the cheap comparisons of the Qwen2.5-Math grader.

These are the checks where that grader (which the multi-attempt and LTE papers
report with) differs from math-verify: numbers equal to a relative tolerance of
1e-4, percentages (gold/100, gold*100), `x = 3` vs `3`, plain-text answers and
multiple-choice letters. All functions are pure string work on inputs capped at
`MAX_ANSWER_CHARS`, with regexes that cannot backtrack badly.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re

# Longer "answers" are wrong without a look: no benchmark gold is near this long.
MAX_ANSWER_CHARS = 2048
REL_TOL = 1e-4
_MAX_EXPONENT = 400  # |e| in 1e400 or 10^{400}; beyond it a number is not parsed

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_CMDS = r"text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname|rm"
_TEXT_GROUP_RE = re.compile(r"\\(?:" + _TEXT_CMDS + r")\s*\{([^{}]*)\}")
# A trailing unit group after a number or closing bracket: `5.4 \text{ cents}`, `15\mbox{ cm}^2`.
_UNIT_GROUP_RE = re.compile(
    r"(?<=[\d}\s)])\s*\\(?:" + _TEXT_CMDS + r")\s*\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?\s*$"
)
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?:\.|(?![a-zA-Z]))|\\[bB]ig[glr]?(?![a-zA-Z])")
_FRAC_DD_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_D_BRACE_RE = re.compile(r"\\frac\s*(\d)\s*(?=\{)")
_FRAC_BRACE_D_RE = re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\d|[a-zA-Z](?![a-zA-Z]))")
_LEADING_DOT_RE = re.compile(r"(?<![\d.])\.(\d)")
_BRACED_COMMA_RE = re.compile(r"\{\s*,\s*\}")  # `14{,}916`, `14 {, }916`
# MATH's thousands separators `,\!` and `{,}` between a digit and exactly three digits
# (`11,\! 111`, `14 {, }916`). Anywhere else they are a comma (`(1,\!2)` is a pair).
_THOUSANDS_MARK_RE = re.compile(r"(?<=\d)\s*(?:,\\!|\{\s*,\s*\})\s*(?=\d{3}(?!\d))")
# A comma followed by a blank separates list items, never thousands (`32, 349`).
_LIST_COMMA_RE = re.compile(r",\s")
# One comma between digits. Thousands when 1-3 digits (no leading 0) precede it and exactly
# three follow (`1,000`); any other grouping can only be a decimal comma (`1000,99`, `0,111`).
_COMMA_NUM_RE = re.compile(r"([+-]?)(\d+),(\d+)")
_THOUSANDS_GROUP_RE = re.compile(r"[1-9]\d{0,2}")
# A thousands-grouped number as a list item: `1,000` in `(1,000, 2)`, where `, ` separates
# items. Not `1,000,2` (the group must end the item) nor the tail of `11,000` or `0.1,000`.
_ITEM_THOUSANDS_RE = re.compile(r"(?<![\w.,])[1-9]\d{0,2}(?:,\d{3})+(?=$|,\s|[^\d,])")
_POINT_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
# A base-n numeral: digits (upper-case letters above 9) and a base subscript, `1112122_3`.
_BASE_NUM_RE = re.compile(r"([0-9A-Z]+)_(?:\{(\d{1,2})\}|(\d))")

_INT = r"\d+"
_DEC = r"\d+\.\d*|\.\d+"
_SEP = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?"
_PLAIN_NUM_RE = re.compile(rf"([+-]?)({_SEP}|{_DEC}|{_INT})(?:[eE]([+-]?\d{{1,4}}))?")
_SCI_NUM_RE = re.compile(
    rf"([+-]?)({_DEC}|{_INT})(?:\\times|\\cdot|\*|x|×)10\^(?:\{{([+-]?\d{{1,4}})\}}|([+-]?\d))"
)
_POW10_RE = re.compile(r"([+-]?)10\^(?:\{([+-]?\d{1,4})\}|([+-]?\d))")
_FRAC_NUM_RE = re.compile(rf"([+-]?)\\frac\{{([+-]?(?:{_DEC}|{_INT}))\}}\{{([+-]?(?:{_DEC}|{_INT}))\}}")
_SLASH_NUM_RE = re.compile(rf"([+-]?)({_DEC}|{_INT})/({_DEC}|{_INT})")
_MIXED_NUM_RE = re.compile(rf"([+-]?)({_INT})\\frac\{{({_INT})\}}\{{({_INT})\}}")
# `5 apples`, `3 cm^2`: unit words (two letters or more) after a number.
_TRAILING_WORDS_RE = re.compile(r"(.*?[\d}])\s+[a-zA-Z]{2,}(?:\s*\^\s*\d)?(?:\s+[a-zA-Z]+)*\.?", re.DOTALL)

_VAR_PREFIX_RE = re.compile(
    r"\s*((?:[A-Za-z]|\\[a-zA-Z]+)(?:_(?:\{[^{}]{1,16}\}|\w))?(?:\([a-zA-Z0-9, ]{1,8}\))?)"
    r"\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)",
    re.DOTALL,
)
_MC_GOLD_RE = re.compile(r"\(?\s*([A-E])\s*\)?")
_MC_PRED_RE = re.compile(r"\(\s*([A-E])\s*\)|([A-E])(?=$|[\s.:,)])")
_TEXT_ANSWER_RE = re.compile(r"[A-Za-z]+(?:[ '\-][A-Za-z]+)*")


def strip_math_delimiters(s: str) -> str:
  """Removes enclosing `$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]` (repeatedly) and blanks."""
  s = s.strip()
  changed = True
  rounds = 0
  while changed and rounds < 4:  # bounded: `$$$$...` must not cost quadratic time
    changed = False
    rounds += 1
    for open_, close in _DELIMS:
      if len(s) >= len(open_) + len(close) and s.startswith(open_) and s.endswith(close):
        inner = s[len(open_) : len(s) - len(close)]
        # `$a$ and $b$` is not one segment.
        if open_ == "$" and "$" in inner:
          continue
        s = inner.strip()
        changed = True
        break
  return s


def _unwrap_outer_box(s: str) -> str:
  for op in ("\\boxed{", "\\fbox{"):
    if s.startswith(op) and s.endswith("}"):
      depth = 0
      for i in range(len(op) - 1, len(s)):
        if s[i] == "{":
          depth += 1
        elif s[i] == "}":
          depth -= 1
          if depth == 0:
            if i == len(s) - 1:
              return s[len(op) : -1].strip()
            break
  return s


def _strip_trailing_backslashes(s: str) -> str:
  """`185\\` -> `185`: a lone trailing backslash or a `\\\\` line break ends no value."""
  s = s.rstrip()
  while s.endswith("\\"):
    s = s[:-1].rstrip()
  return s


def normalize(s: str) -> str:
  """Canonical LaTeX form of a final answer (single spaces kept).

  Drops what never changes the value: delimiters, `\\left`/`\\right`, spacing
  commands, `^\\circ`, `\\%`, `\\$`, thousands `,\\!` and `{,}`, `dfrac`, trailing unit
  text and a trailing period; unwraps `\\text{...}`; expands `\\frac43`, `\\sqrt2`.
  """
  s = s.replace("\x00", "")
  s = strip_math_delimiters(s)
  s = _unwrap_outer_box(s)
  s = strip_math_delimiters(s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _strip_trailing_backslashes(s)
  s = _THOUSANDS_MARK_RE.sub("", s)
  s = s.replace(",\\!", ",")
  s = _BRACED_COMMA_RE.sub(",", s)
  s = _LEFT_RIGHT_RE.sub("", s)
  s = _SPACING_RE.sub(" ", s)
  s = _DEGREE_RE.sub("", s)
  s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
  for _ in range(4):
    new = _UNIT_GROUP_RE.sub("", s)
    if new == s:
      break
    s = new
  for _ in range(4):
    new = _TEXT_GROUP_RE.sub(r"\1", s)
    if new == s:
      break
    s = new
  s = _FRAC_DD_RE.sub(r"\\frac{\1}{\2}", s)
  s = _FRAC_D_BRACE_RE.sub(r"\\frac{\1}", s)
  s = _FRAC_BRACE_D_RE.sub(r"\\frac\1{\2}", s)
  s = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", s)
  s = _LEADING_DOT_RE.sub(r"0.\1", s)
  s = " ".join(s.split())
  s = _strip_trailing_backslashes(s.rstrip(".").strip())
  return s


def squash(s: str) -> str:
  """`s` without any whitespace: the form compared for string equality."""
  return "".join(s.split())


def _exp(*groups: str | None) -> int | None:
  for g in groups:
    if g:
      e = int(g)
      return e if abs(e) <= _MAX_EXPONENT else None
  return 0


def parse_number(s: str) -> fractions.Fraction | None:
  """The exact value of a plain numeric answer in normalised form, else None.

  Accepts integers, decimals, `1,234`, `4.5e33`, `4.5\\times10^{33}`, `10^{-3}`,
  `\\frac{3}{4}`, `3/4`, mixed `1\\frac{4}{5}` and trailing unit words (`5 cm`).
  """
  if len(s) > 400 or _LIST_COMMA_RE.search(s):
    return None
  m = _TRAILING_WORDS_RE.fullmatch(s)
  if m:
    s = m.group(1)
  s = squash(s)
  if not s:
    return None
  F = fractions.Fraction
  if m := _PLAIN_NUM_RE.fullmatch(s):
    e = _exp(m.group(3))
    if e is None:
      return None
    v = F(m.group(2).replace(",", "")) * F(10) ** e
    return -v if m.group(1) == "-" else v
  if m := _SCI_NUM_RE.fullmatch(s):
    e = _exp(m.group(3), m.group(4))
    if e is None:
      return None
    v = F(m.group(2)) * F(10) ** e
    return -v if m.group(1) == "-" else v
  if m := _POW10_RE.fullmatch(s):
    e = _exp(m.group(2), m.group(3))
    if e is None:
      return None
    v = F(10) ** e
    return -v if m.group(1) == "-" else v
  for rx in (_FRAC_NUM_RE, _SLASH_NUM_RE):
    if m := rx.fullmatch(s):
      den = F(m.group(3))
      if den == 0:
        return None
      v = F(m.group(2)) / den
      return -v if m.group(1) == "-" else v
  if m := _MIXED_NUM_RE.fullmatch(s):
    den = F(m.group(4))
    if den == 0:
      return None
    v = F(m.group(2)) + F(m.group(3)) / den
    return -v if m.group(1) == "-" else v
  return None


def decimal_comma(s: str) -> fractions.Fraction | None:
  """The value of `s` read with a decimal comma (`1000,99`, `0,111`), else None.

  None too where the comma can be a thousands separator (`1,000` is a thousand).
  """
  m = _COMMA_NUM_RE.fullmatch(s)
  if not m or (_THOUSANDS_GROUP_RE.fullmatch(m.group(2)) and len(m.group(3)) == 3):
    return None
  v = fractions.Fraction(f"{m.group(2)}.{m.group(3)}")
  return -v if m.group(1) == "-" else v


def point_decimal(s: str) -> fractions.Fraction | None:
  """The value of a plain decimal written with a point (`1000.99`), else None."""
  return fractions.Fraction(s) if _POINT_DECIMAL_RE.fullmatch(s) else None


@dataclasses.dataclass(frozen=True)
class BaseNumeral:
  digits: str
  base: int

  @property
  def value(self) -> int:
    return int(self.digits, self.base)


def parse_base_numeral(s: str) -> BaseNumeral | None:
  """`1112122_3`, `4210_{5}` -> digits and base (2..36, digits valid in it), else None."""
  m = _BASE_NUM_RE.fullmatch(squash(s))
  if not m or len(m.group(1)) > 200:
    return None
  base = int(m.group(2) or m.group(3))
  if not 2 <= base <= 36:
    return None
  try:
    int(m.group(1), base)
  except ValueError:
    return None
  return BaseNumeral(m.group(1), base)


def _close(a: fractions.Fraction, b: fractions.Fraction) -> bool:
  if a == b:
    return True
  if a.denominator == 1 and b.denominator == 1:
    return False  # integers are compared exactly (tolerance would equate 10000 and 10001)
  try:
    return math.isclose(float(a), float(b), rel_tol=REL_TOL)
  except OverflowError:
    return False


def numbers_equal(pred: fractions.Fraction, gold: fractions.Fraction) -> bool:
  """Qwen2.5-Math numeric equality: relative tolerance 1e-4, gold, gold/100, gold*100."""
  return any(_close(pred, g) for g in (gold, gold / 100, gold * 100))


@dataclasses.dataclass(frozen=True)
class VarPrefix:
  lhs: str
  rhs: str


def split_var_prefix(s: str) -> VarPrefix | None:
  """`x = 3` -> (x, 3); also `f(x) = 2x`, `a_{n} = ...`, `x \\in [0, 1]`. None otherwise."""
  m = _VAR_PREFIX_RE.fullmatch(s)
  if not m:
    return None
  rhs = m.group(2).strip()
  if "=" in rhs or not rhs:
    return None
  return VarPrefix(squash(m.group(1)), rhs)


def gold_choice(s: str) -> str | None:
  """The letter of a multiple-choice gold (`(C)`, `\\text{(C)}` normalised, `C`)."""
  m = _MC_GOLD_RE.fullmatch(s)
  return m.group(1) if m else None


def pred_choice(s: str) -> str | None:
  """The letter a prediction opens with: `C`, `(C)`, `(C) 12`, `C: 12`."""
  m = _MC_PRED_RE.match(s)
  if not m:
    return None
  return m.group(1) or m.group(2)


def text_answer(s: str) -> str | None:
  """Lower-cased words of a plain-text answer (`Evelyn`, `even`), else None."""
  if _TEXT_ANSWER_RE.fullmatch(s) and max(len(w) for w in re.split(r"[ '\-]", s)) >= 3:
    return s.lower()
  return None


def split_top_level(s: str) -> list[str]:
  """Splits on commas outside any bracket: `(1,2), 3` -> [`(1,2)`, `3`]."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(s):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(s[start:i].strip())
      start = i + 1
  parts.append(s[start:].strip())
  return parts


def join_item_thousands(s: str) -> str:
  """`1,000, 2` -> `1000, 2`: in a list whose items are separated by `, `, a comma inside a
  thousands-grouped number is not a separator. `s` unchanged when it has no `, `."""
  if not _LIST_COMMA_RE.search(s):
    return s
  return _ITEM_THOUSANDS_RE.sub(lambda m: m.group().replace(",", ""), s)


@dataclasses.dataclass(frozen=True)
class Bracketed:
  open: str
  inner: str
  close: str


def outer_brackets(s: str) -> Bracketed | None:
  """The bracket pair enclosing all of `s` (`(..)`, `[..]`, `(..]`, `\\{..\\}`), else None."""
  if s.startswith("\\{") and s.endswith("\\}"):
    open_, close, inner = "\\{", "\\}", s[2:-2]
  elif s[:1] in "([" and s[-1:] in ")]" and len(s) >= 2:
    open_, close, inner = s[0], s[-1], s[1:-1]
  else:
    return None
  depth = 0
  for c in inner:  # the first bracket must close only at the end
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth < 0:
        return None
  if depth != 0:
    return None
  return Bracketed(open_, inner.strip(), close)


def prepare_gold(gold: str | int | float) -> str:
  """A dataset gold answer as a string; JSON numbers such as amc23's `27.0` -> `27`."""
  if isinstance(gold, bool):
    return str(gold)
  if isinstance(gold, int):
    return str(gold)
  if isinstance(gold, float):
    return str(int(gold)) if gold.is_integer() else repr(gold)
  return gold
