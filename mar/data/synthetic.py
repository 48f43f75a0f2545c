"""Synthetic arithmetic questions with exact integer answers, for the demo.

Short enough for a tiny model with a ~128-token context ("What is 12+7-3?");
difficulty grows with the number of digits, the number of operands and the ops.
"""

from __future__ import annotations

import random

from mar.data.datasets import Example

_OPS = "+-*"


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
  d = rng.randint(min_digits, max_digits)
  low = 0 if d == 1 else 10 ** (d - 1)
  return rng.randint(low, 10**d - 1)


def _evaluate(operands: list[int], ops: list[str]) -> int:
  """Value with the usual precedence (* before + and -)."""
  terms = [operands[0]]
  signs = [1]
  for op, x in zip(ops, operands[1:]):
    if op == "*":
      terms[-1] *= x
    else:
      terms.append(x)
      signs.append(1 if op == "+" else -1)
  return sum(s * t for s, t in zip(signs, terms))


def make_arithmetic_examples(
    n: int,
    seed: int,
    min_digits: int = 1,
    max_digits: int = 2,
    num_operands: int = 2,
    ops: str = "+-",
    allow_negative: bool = True,
) -> list[Example]:
  """`n` questions "What is a+b-c?" with integer answers; same seed, same list."""
  if not 1 <= min_digits <= max_digits:
    raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
  if num_operands < 2:
    raise ValueError(f"num_operands must be >= 2, got {num_operands}")
  if not ops or any(o not in _OPS for o in ops):
    raise ValueError(f"ops must be a non-empty subset of {_OPS!r}, got {ops!r}")
  rng = random.Random(seed)
  out = []
  draws = 0
  while len(out) < n:
    draws += 1
    if draws > 1000 * (n + 1):
      raise ValueError("allow_negative=False rejects almost every draw; change ops or operands")
    operands = [_operand(rng, min_digits, max_digits) for _ in range(num_operands)]
    chosen = [rng.choice(ops) for _ in range(num_operands - 1)]
    value = _evaluate(operands, chosen)
    if value < 0 and not allow_negative:
      continue
    expr = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(chosen, operands[1:]))
    out.append(Example(question=f"What is {expr}?", answer=str(value), source="arithmetic", index=len(out)))
  return out


def examples_from_config(s, n: int | None = None, seed: int | None = None) -> list[Example]:
  """The questions a `data.synthetic` / `eval.synthetic` config node describes.

  `n` and `seed` default to the node's `num_examples` and `seed`; `num_operands` and `ops`
  (the harder, multi-step variant of configs/miniature.py) default to "a+b" / "a-b".
  """
  return make_arithmetic_examples(
      s.num_examples if n is None else n, s.seed if seed is None else seed,
      min_digits=s.min_digits, max_digits=s.max_digits,
      num_operands=s.get("num_operands", 2), ops=s.get("ops", "+-"))
