"""Is a predicted answer equal to a gold answer? math-verify plus Qwen2.5-Math rules.

Order of checks, cheapest first: normalised strings, multiple-choice letters, text
answers, plain numbers (tolerance 1e-4 and percentages, as the papers' grader),
constant expressions evaluated in floats (tolerance 1e-4, `numeric.py`), `x = 3`
vs `3`, tuples / intervals / lists element-wise, then math-verify (parse +
verify), then numeric evaluation of both sympy values (tolerance 1e-4).

A deadline bounds every check; a timeout or any exception is a wrong answer. On the
main thread the deadline is a SIGALRM timer; on any other thread (e.g. a JAX host
callback) the check runs in a worker process of a shared `BatchVerifier`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import re
import signal
import threading
import time
import weakref
from typing import Any, Iterator

from mar.verify import extract
from mar.verify import normalize as norm
from mar.verify import numeric

DEFAULT_TIMEOUT = 3.0
_MAX_ELEMENTS = 64  # element-wise comparison of longer lists is left to math-verify
_MAX_UNORDERED = 12  # unordered matching is quadratic in calls
_PROSE_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
_TEXT_ARG_RE = re.compile(r"\\[a-zA-Z]+\s*\{[^{}]*\}|\\[a-zA-Z]+")
_SCI_E_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d{1,4})(?![\w.])")


class VerificationTimeout(BaseException):
  """Raised by the SIGALRM deadline; a BaseException so `except Exception` in
  sympy or math-verify cannot swallow it."""


# ---------------------------------------------------------------------------
# Deadline.


class _Alarm:
  armed = False


def _must_not_raise_in(frame: Any) -> bool:
  """True inside an import, or inside what the garbage collector runs, on the stack.

  A half-imported sympy module stays broken for the life of the process; an exception
  raised in a `gc.callbacks` hook (JAX registers one), a weakref callback or a __del__
  is not propagated, only printed, so the deadline would be lost there.
  """
  gc_hooks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if (code.co_filename.startswith("<frozen importlib") or code.co_filename == weakref.__file__
        or code.co_name == "__del__" or code in gc_hooks):
      return True
    frame = frame.f_back
  return False


def _on_alarm(signum: int, frame: Any) -> None:
  del signum
  # The timer re-fires every 50 ms, so a deadline put off here is raised once the
  # import or the collector's callback is done.
  if _Alarm.armed and not _must_not_raise_in(frame):
    raise VerificationTimeout()


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
  """Raises VerificationTimeout in the body after `seconds` (main thread only).

  The timer re-fires every 50 ms until the body ends, so a handler that catches
  the exception (a bare `except:` deep in sympy) cannot outlive the deadline.
  """
  if seconds is None or seconds <= 0:
    yield
    return
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("deadline() needs the main thread (it uses SIGALRM)")
  old_handler = signal.signal(signal.SIGALRM, _on_alarm)
  old_timer = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
  start = time.monotonic()
  _Alarm.armed = True
  try:
    yield
  finally:
    _Alarm.armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_handler)
    if old_timer[0] > 0:  # give back what remains of an enclosing timer
      left = max(old_timer[0] - (time.monotonic() - start), 1e-3)
      signal.setitimer(signal.ITIMER_REAL, left, old_timer[1])


# ---------------------------------------------------------------------------
# Cheap checks (no sympy): safe to run without a deadline.


def _quick(p: str, g: str, depth: int = 0) -> bool | None:
  """Decides on normalised strings when a cheap rule applies, else None."""
  if not p:
    return False
  if norm.squash(p) == norm.squash(g):
    return True
  base = _base_numerals(p, g)
  if base is not None:
    return base
  gl = norm.gold_choice(g)
  if gl is not None:
    return norm.pred_choice(p) == gl
  gt, pt = norm.text_answer(g), norm.text_answer(p)
  if gt is not None and pt is not None and gt == pt:
    return True
  comma = _decimal_comma(p, g)
  if comma is not None:
    return comma
  gn = norm.parse_number(g)
  if gn is not None:
    pn = norm.parse_number(p)
    if pn is not None:
      return norm.numbers_equal(pn, gn)
  g_val = numeric.evaluate(g)
  if g_val is not None:
    p_val = numeric.evaluate(p)
    if p_val is not None:
      verdict = numeric.compare(p_val, g_val, norm.REL_TOL)
      if verdict is not None:
        return verdict
  if depth == 0:
    pv, gv = norm.split_var_prefix(p), norm.split_var_prefix(g)
    if pv is not None and gv is None and "=" not in g:
      return _quick(pv.rhs, g, depth + 1)
    if gv is not None and pv is None and "=" not in p:
      return _quick(p, gv.rhs, depth + 1)
    if pv is not None and gv is not None and pv.lhs == gv.lhs:
      return _quick(pv.rhs, gv.rhs, depth + 1)
  return None


def _base_numerals(p: str, g: str) -> bool | None:
  """Base-n numerals (`1112122_3`) are equal only digit for digit in their base.

  Never to a tolerance: `1112112_3` and `1112122_3` differ by 1e-5 relative. A numeral
  against plain digits is equal only in base 10 (`59_{10}` and `59`).
  """
  pb, gb = norm.parse_base_numeral(p), norm.parse_base_numeral(g)
  if pb is None and gb is None:
    return None
  if pb is not None and gb is not None:
    return pb.value == gb.value
  numeral, other = (pb, g) if pb is not None else (gb, p)
  other = norm.squash(other)
  return numeral.base == 10 and other.isdigit() and int(other) == numeral.value


def _decimal_comma(p: str, g: str) -> bool | None:
  """`1000,99` against `1000.99` (either side); None where the rule does not apply.

  The comma is read as a decimal comma only where no thousands separator can be meant
  (`normalize.decimal_comma`) and the other side is a decimal written with a point.
  """
  pc, gc = norm.decimal_comma(norm.squash(p)), norm.decimal_comma(norm.squash(g))
  if pc is not None:
    gd = norm.point_decimal(norm.squash(g))
    if gd is not None:
      return norm.numbers_equal(pc, gd)
  if gc is not None:
    pd = norm.point_decimal(norm.squash(p))
    if pd is not None:
      return norm.numbers_equal(pd, gc)
  return None


def quick_match(answer: str, gold: str) -> bool | None:
  """The cheap rules alone on raw strings: True/False when decided, None otherwise."""
  if len(answer) > norm.MAX_ANSWER_CHARS or len(gold) > norm.MAX_ANSWER_CHARS:
    return False
  return _quick(norm.normalize(answer), norm.normalize(gold))


# ---------------------------------------------------------------------------
# math-verify bridge.


def _quiet_math_verify() -> None:
  # We disable math-verify's own SIGALRM timeouts (we own the deadline); it warns
  # once about that, and logs every parse failure. Neither is news.
  for name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(name).setLevel(logging.CRITICAL)


@functools.lru_cache(maxsize=8192)
def _mv_parse(s: str) -> tuple[Any, ...]:
  import math_verify  # pylint: disable=g-import-not-at-top

  _quiet_math_verify()
  s = _SCI_E_RE.sub(r"\1\\times10^{\2}", s)  # minerva golds: 4.5e33
  return tuple(math_verify.parse("\\boxed{" + s + "}", parsing_timeout=None))


def _mv_verify(gold_parsed: tuple[Any, ...], pred_parsed: tuple[Any, ...]) -> bool:
  import math_verify  # pylint: disable=g-import-not-at-top

  if not gold_parsed or not pred_parsed:
    return False
  return bool(math_verify.verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


def _numeric_value(parsed: tuple[Any, ...]) -> complex | None:
  import sympy  # pylint: disable=g-import-not-at-top

  for x in parsed:
    if isinstance(x, sympy.Expr) and not x.free_symbols:
      v = sympy.N(x.doit(), 20)
      if v.is_number and v.is_finite:
        return complex(v)
  return None


def _numerically_close(gold_parsed: tuple[Any, ...], pred_parsed: tuple[Any, ...]) -> bool:
  """Qwen's last resort: evaluate both and compare with relative tolerance 1e-4."""
  g, p = _numeric_value(gold_parsed), _numeric_value(pred_parsed)
  if g is None or p is None:
    return False
  return abs(g - p) <= norm.REL_TOL * max(abs(g), abs(p))


# ---------------------------------------------------------------------------
# Full comparison.


def _elementwise(p: str, g: str, depth: int) -> bool | None:
  """Tuples and intervals in order, bare lists and `\\{..\\}` sets in any order.

  A tuple (`(..)` / `[..]` on either side, brackets agreeing where both have them) is
  an ordered answer: its verdict is final, so math-verify cannot compare it as a set.
  None where this rule does not apply or cannot tell (unordered lists that differ).
  """
  pb, gb = norm.outer_brackets(p), norm.outer_brackets(g)
  p_items, g_items = (pb.inner if pb else p), (gb.inner if gb else g)
  pe, ge = norm.split_top_level(p_items), norm.split_top_level(g_items)
  if len(pe) != len(ge):  # `(1,000, 2)` vs `(1000, 2)`: a thousands comma split a number
    pe = norm.split_top_level(norm.join_item_thousands(p_items))
    ge = norm.split_top_level(norm.join_item_thousands(g_items))
  if len(ge) < 2 and len(pe) < 2:
    return None
  if len(pe) != len(ge) or len(ge) > _MAX_ELEMENTS:
    return None
  brackets = {(b.open, b.close) for b in (pb, gb) if b}
  if len(brackets) > 1:
    return None if any(o == "\\{" for o, _ in brackets) else False
  ordered = any(o in ("(", "[") for o, _ in brackets)
  if ordered:
    return all(_match(a, b, depth + 1) for a, b in zip(pe, ge))
  if len(ge) > _MAX_UNORDERED:
    return all(_match(a, b, depth + 1) for a, b in zip(pe, ge)) or None
  unused = list(range(len(pe)))
  for b in ge:  # greedy matching is exact when equality is transitive
    hit = next((i for i in unused if _match(pe[i], b, depth + 1)), None)
    if hit is None:
      return None
    unused.remove(hit)
  return True


def _match(p: str, g: str, depth: int = 0) -> bool:
  """Normalised prediction vs normalised gold; may be slow or raise."""
  q = _quick(p, g)
  if q is not None:
    return q
  if depth < 2:
    listed = _elementwise(p, g, depth)
    if listed is not None:
      return listed
  pv, gv = norm.split_var_prefix(p), norm.split_var_prefix(g)
  if pv is not None and gv is None and "=" not in g:
    p = pv.rhs
  elif gv is not None and pv is None and "=" not in p:
    g = gv.rhs
  gold_parsed, pred_parsed = _mv_parse(g), _mv_parse(p)
  if _mv_verify(gold_parsed, pred_parsed):
    return True
  return _numerically_close(gold_parsed, pred_parsed)


def answers_match(answer: str, gold: str) -> bool:
  """Final answer vs gold with all rules, no deadline (callers add one)."""
  if len(answer) > norm.MAX_ANSWER_CHARS or len(gold) > norm.MAX_ANSWER_CHARS:
    return False
  return _match(norm.normalize(answer), norm.normalize(gold))


# Comparisons that walk most of sympy / math-verify's lazily imported code.
_WARM_UP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("x^2+1", "1+x^2"),
    ("\\sqrt{2}", "1.414"),
    ("(1,2]", "[1,2)"),
    ("\\{1,2\\}", "\\{2,3\\}"),
    ("x=1", "y=1"),
    ("x \\le 2", "2 \\ge x"),
    ("1+2i", "2i+2"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("\\sin x", "\\cos x"),
    ("e^{i\\pi}", "-1"),
    ("\\log_2 8+\\binom{4}{2}+3!", "12"),
    ("\\int_0^1 x dx", "\\frac{1}{2}"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "x<0"),
    ("\\frac{1}{0}", "\\infty"),
)
_warm_lock = threading.Lock()
_warm = False


def warm_up() -> None:
  """Imports and exercises sympy / math-verify once, outside any deadline.

  So that the first real check does not spend its deadline on imports.
  """
  global _warm
  with _warm_lock:
    if _warm:
      return
    import sympy  # pylint: disable=g-import-not-at-top,unused-import
    import sympy.assumptions  # pylint: disable=g-import-not-at-top,unused-import

    for a, b in _WARM_UP_PAIRS:
      try:
        answers_match(a, b)
      except Exception:  # pylint: disable=broad-except
        pass
    _warm = True


def answers_match_within(answer: str, gold: str, timeout: float | None) -> bool:
  """`answers_match` under a SIGALRM deadline; timeout or error -> False (main thread)."""
  return check_within(answer, gold, timeout)[0]


def check_within(answer: str, gold: str, timeout: float | None) -> tuple[bool, bool]:
  """(equal, timed_out) of `answers_match` under a SIGALRM deadline (main thread)."""
  warm_up()
  try:
    with deadline(timeout):
      return answers_match(answer, gold), False
  except VerificationTimeout:
    return False, True
  except Exception:  # pylint: disable=broad-except
    return False, False
  except BaseException as e:  # math-verify's TimeoutException, if it ever fires
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
      raise
    return False, True


def _looks_like_response(s: str) -> bool:
  """A sentence or a multi-line text rather than a bare answer."""
  if "\n" in s.strip():
    return True
  prose = _TEXT_ARG_RE.sub(" ", s)  # words inside \text{...} are part of an answer
  return len(_PROSE_WORD_RE.findall(prose)) >= 3


def prediction_answer(pred: str) -> str | None:
  """The answer in `pred`: a bare answer, a `$...$` expression or a whole response."""
  if not isinstance(pred, str):
    return None
  final = extract.extract_final(pred)
  if final is not None:
    return final
  stripped = norm.strip_math_delimiters(pred)
  if "$" not in stripped and not _looks_like_response(stripped):
    return stripped
  return extract.extract_answer(pred)

