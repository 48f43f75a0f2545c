"""Fast float evaluation of constant LaTeX expressions (`3\\sqrt{13}`, `\\frac{\\pi}{4}+1`).

The Qwen2.5-Math grader counts two expressions equal when their numeric values
agree to a relative 1e-4. For answers without variables a small recursive-descent
parser gets those values in microseconds, where a sympy parse takes tens of
milliseconds. Anything outside the grammar (variables, `i`, `\\infty`, lists,
equations, factorials, mixed numbers, ...) gives None and is left to sympy.

Every value carries a bound on its floating-point error; when the bounds are not
tiny next to the values (cancellation, `\\sin\\pi`), `compare` declines to decide.
The parser is linear in the input and depth-limited.
"""

from __future__ import annotations

import dataclasses
import math
import re

_TOKEN_RE = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(\\[a-zA-Z]+)|(\S))")
_EPS = 2.3e-16  # a little over double precision's unit round-off
_MAX_DEPTH = 60
_MAX_TOKENS = 400
_IGNORED = {"\\left", "\\right", "\\displaystyle"}
_FUNCS = ("\\sin", "\\cos", "\\tan", "\\ln", "\\exp")
_IMPLICIT_START = ("(", "{", "\\pi", "\\frac", "\\sqrt") + _FUNCS
# Decide only when the error bounds are this small relative to the values.
_TRUSTED_REL_ERR = 1e-9


class _Unsupported(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Value:
  value: float
  err: float  # bound on |value - exact value|


def _number(tok: str) -> Value:
  v = float(tok)
  exact = tok.isdigit() and len(tok) <= 15  # integers below 2**53 are exact floats
  return Value(v, 0.0 if exact else _EPS * abs(v))


def _add(a: Value, b: Value) -> Value:
  v = a.value + b.value
  return Value(v, a.err + b.err + _EPS * abs(v))


def _mul(a: Value, b: Value) -> Value:
  v = a.value * b.value
  err = abs(a.value) * b.err + abs(b.value) * a.err + a.err * b.err + _EPS * abs(v)
  return Value(v, err)


def _div(a: Value, b: Value) -> Value:
  if abs(b.value) <= b.err:  # the denominator may be zero
    raise _Unsupported()
  v = a.value / b.value
  err = (a.err + abs(v) * b.err) / (abs(b.value) - b.err) + _EPS * abs(v)
  return Value(v, err)


def _pow(a: Value, e: Value) -> Value:
  if abs(e.value) > 1000:
    raise _Unsupported()
  integer_exp = e.err == 0 and float(e.value).is_integer()
  if a.value < 0 and not integer_exp:
    raise _Unsupported()
  if a.value == 0:
    if a.err or e.value <= 0:
      raise _Unsupported()
    return Value(0.0, 0.0)
  rel_a = a.err / abs(a.value)
  if rel_a > 1e-3:
    raise _Unsupported()
  try:
    v = a.value**e.value
    rel = abs(e.value) * rel_a * 1.01 + abs(math.log(abs(a.value))) * e.err
  except (OverflowError, ZeroDivisionError):
    raise _Unsupported() from None
  if isinstance(v, complex):
    raise _Unsupported()
  return Value(v, abs(v) * rel + _EPS * abs(v))


def _func(name: str, x: Value) -> Value:
  try:
    if name == "\\sin":
      v, err = math.sin(x.value), x.err
    elif name == "\\cos":
      v, err = math.cos(x.value), x.err
    elif name == "\\tan":
      c = math.cos(x.value)
      if abs(c) <= 2 * x.err + 1e-12:
        raise _Unsupported()
      v, err = math.tan(x.value), x.err / (c * c - 2 * x.err)
    elif name == "\\ln":
      if x.value <= x.err:
        raise _Unsupported()
      v, err = math.log(x.value), x.err / (x.value - x.err)
    else:
      v = math.exp(x.value)
      err = v * (math.exp(x.err) - 1)
  except (ValueError, OverflowError):
    raise _Unsupported() from None
  return Value(v, err + _EPS * (abs(v) + 1))


def _tokenize(s: str) -> list[str]:
  tokens, pos = [], 0
  for m in _TOKEN_RE.finditer(s):
    pos = m.end()
    tok = m.group(1) or m.group(2) or m.group(3)
    if tok not in _IGNORED:
      tokens.append(tok)
    if len(tokens) > _MAX_TOKENS:
      raise _Unsupported()
  if s[pos:].strip():
    raise _Unsupported()
  return tokens


class _Parser:
  """expr := term (+|- term)*;  term := unary ((*|/|implicit) unary)*;
  unary := (-|+) unary | power;  power := atom (^ exponent)?;
  atom := number | \\pi | \\frac G G | \\sqrt[n]? G | func G | (expr) | {expr}."""

  def __init__(self, tokens: list[str]):
    self.t = tokens
    self.i = 0
    self.depth = 0

  def peek(self) -> str | None:
    return self.t[self.i] if self.i < len(self.t) else None

  def take(self, want: str | None = None) -> str:
    tok = self.peek()
    if tok is None or (want is not None and tok != want):
      raise _Unsupported()
    self.i += 1
    return tok

  def parse(self) -> Value:
    v = self.expr()
    if self.peek() is not None:
      raise _Unsupported()
    return v

  def expr(self) -> Value:
    self.depth += 1
    if self.depth > _MAX_DEPTH:
      raise _Unsupported()
    v = self.term()
    while self.peek() in ("+", "-"):
      negate = self.take() == "-"
      w = self.term()
      v = _add(v, Value(-w.value, w.err) if negate else w)
    self.depth -= 1
    return v

  def term(self) -> Value:
    v = self.unary()
    while True:
      tok = self.peek()
      if tok in ("*", "\\cdot", "\\times"):
        self.take()
        v = _mul(v, self.unary())
      elif tok == "/":
        self.take()
        v = _div(v, self.unary())
      elif tok in _IMPLICIT_START:
        if tok == "\\frac" and self.t[self.i - 1][:1].isdigit():
          raise _Unsupported()  # `1\frac{4}{5}`: a mixed number, not a product
        v = _mul(v, self.unary())  # 3\sqrt{2}, 2\pi, (1)(2)
      else:
        return v

  def unary(self) -> Value:
    if self.peek() == "-":
      self.take()
      v = self.unary()
      return Value(-v.value, v.err)
    if self.peek() == "+":
      self.take()
      return self.unary()
    return self.power()

  def power(self) -> Value:
    base = self.atom()
    if self.peek() != "^":
      return base
    self.take()
    if self.peek() == "-":  # 10^-3
      self.take()
      e = self.group()
      return _pow(base, Value(-e.value, e.err))
    return _pow(base, self.group())

  def digit(self) -> Value:
    """One digit of a number token: in LaTeX `\\frac12` and `x^23` take one digit."""
    tok = self.take()
    if len(tok) > 1 and tok.isdigit():
      self.t[self.i - 1 : self.i] = [tok[0], tok[1:]]
      tok = tok[0]
    return _number(tok)

  def group(self) -> Value:
    tok = self.peek()
    if tok == "{":
      self.take()
      v = self.expr()
      self.take("}")
      return v
    if tok is not None and tok[0].isdigit():
      return self.digit()
    return self.atom()

  def atom(self) -> Value:
    tok = self.take()
    if tok[0].isdigit() or tok[0] == ".":
      return _number(tok)
    if tok == "\\pi":
      return Value(math.pi, _EPS * math.pi)
    if tok in ("(", "{"):
      v = self.expr()
      self.take(")" if tok == "(" else "}")
      return v
    if tok == "\\frac":
      return _div(self.group(), self.group())
    if tok == "\\sqrt":
      if self.peek() == "[":
        self.take()
        index = self.expr()
        self.take("]")
        return _pow(self.group(), _div(Value(1.0, 0.0), index))
      return _pow(self.group(), Value(0.5, 0.0))
    if tok in _FUNCS:
      return _func(tok, self.group() if self.peek() in ("(", "{") else self.power())
    raise _Unsupported()


def evaluate(s: str) -> Value | None:
  """The value of a constant LaTeX expression with an error bound, or None."""
  if len(s) > 500:
    return None
  try:
    v = _Parser(_tokenize(s)).parse()
  except (_Unsupported, ValueError, OverflowError, ZeroDivisionError, RecursionError):
    return None
  if not (math.isfinite(v.value) and math.isfinite(v.err)):
    return None
  return v


def compare(pred: Value, gold: Value, rel_tol: float) -> bool | None:
  """Equal within relative `rel_tol`; None when float error could change the verdict."""
  scale = max(abs(pred.value), abs(gold.value))
  if pred.err + gold.err > _TRUSTED_REL_ERR * scale:
    return None
  return abs(pred.value - gold.value) <= rel_tol * scale
