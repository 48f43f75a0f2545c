"""Benchmarks and training sets as `Example`s: gold-answer rules, JSONL reading.

Other formats (Parquet, TFDS) hand their records to the same functions (mar.data.sources).

Gold answers follow the graders the papers used (see the data's SOURCE.md):
amc23 stores floats (`27.0` -> `27`), minerva's gold is the last box of its
solution, olympiadbench's is `final_answer[0]` without `$`, gsm8k's follows the
final `####`. Bad input raises DatasetError naming file, line and field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator

from absl import logging

from mar.verify.extract import extract_boxed

BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k")
# The six the LTE paper averages over (the multi-attempt paper drops aime25).
EVAL_BENCHMARKS = ("math500", "minerva_math", "olympiadbench", "amc23", "aime24", "aime25")


@dataclasses.dataclass(frozen=True)
class Example:
  """One question with its gold final answer; `index` is its record number in the file."""

  question: str
  answer: str
  source: str
  index: int


class DatasetError(ValueError):
  """Malformed dataset input; the message names file, line and field."""


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, record) for each non-blank line; errors name file and line."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: no such file")
  count = 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise DatasetError(
            f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}"
        )
      count += 1
      yield lineno, record
  if count == 0:
    raise DatasetError(f"{path}: empty file, expected JSON lines")


def _field(path: str, lineno: int | str, record: dict[str, Any], key: str, types: tuple[type, ...]) -> Any:
  if key not in record:
    raise DatasetError(
        f"{path}:{lineno}: field {key!r}: missing (record has {sorted(record)})"
    )
  value = record[key]
  if not isinstance(value, types) or isinstance(value, bool):
    expected = " or ".join(t.__name__ for t in types)
    raise DatasetError(
        f"{path}:{lineno}: field {key!r}: expected {expected}, found {type(value).__name__}"
    )
  return value


# -- gold answers, one rule per benchmark -------------------------------------


def _gold_string(path: str, lineno: int, record: dict[str, Any], key: str) -> str:
  return _field(path, lineno, record, key, (str,)).strip()


def _gold_amc(path: str, lineno: int, record: dict[str, Any]) -> str:
  value = _field(path, lineno, record, "answer", (int, float, str))
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return str(value).strip()


def _gold_minerva(path: str, lineno: int, record: dict[str, Any]) -> str:
  solution = _field(path, lineno, record, "solution", (str,))
  box = extract_boxed(solution)
  if box is None:
    raise DatasetError(f"{path}:{lineno}: field 'solution': expected a \\boxed{{}} answer, found none")
  return box.strip()


def _gold_olympiad(path: str, lineno: int, record: dict[str, Any]) -> str:
  answers = _field(path, lineno, record, "final_answer", (list,))
  if not answers or not isinstance(answers[0], str):
    raise DatasetError(
        f"{path}:{lineno}: field 'final_answer': expected a non-empty list of strings, found {answers!r:.80}"
    )
  return re.sub(r"(?<!\\)\$", "", answers[0]).strip()


def _gold_gsm8k(path: str, lineno: int, record: dict[str, Any]) -> str:
  answer = _field(path, lineno, record, "answer", (str,))
  if "####" not in answer:
    raise DatasetError(f"{path}:{lineno}: field 'answer': expected a final '#### <number>', found none")
  return answer.rsplit("####", 1)[1].strip().replace(",", "")


_GoldFn = Callable[[str, int, dict[str, Any]], str]
_SPECS: dict[str, tuple[str, _GoldFn]] = {
    "math500": ("problem", lambda p, n, r: _gold_string(p, n, r, "answer")),
    "aime24": ("problem", lambda p, n, r: _gold_string(p, n, r, "answer")),
    "aime25": ("problem", lambda p, n, r: _gold_string(p, n, r, "answer")),
    "amc23": ("problem", _gold_amc),
    "minerva_math": ("problem", _gold_minerva),
    "olympiadbench": ("question", _gold_olympiad),
    "gsm8k": ("question", _gold_gsm8k),
}


def benchmark_path(name: str, data_dir: str) -> str:
  """`<data_dir>/<name>/test.jsonl`, or under `<data_dir>/benchmarks/`."""
  if name not in _SPECS:
    raise DatasetError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
  for candidate in (
      os.path.join(data_dir, name, "test.jsonl"),
      os.path.join(data_dir, "benchmarks", name, "test.jsonl"),
  ):
    if os.path.isfile(candidate):
      return candidate
  raise DatasetError(
      f"{os.path.join(data_dir, 'benchmarks', name, 'test.jsonl')}: no such file "
      f"(data_dir={data_dir!r})"
  )


# (where, record label, record): the file or source, the line / record number, the fields.
Record = tuple[str, "int | str", dict[str, Any]]


def jsonl_records(path: str) -> Iterator[Record]:
  return ((path, lineno, record) for lineno, record in read_jsonl(path))


def benchmark_examples(name: str, records: Iterable[Record]) -> list[Example]:
  """A benchmark's questions and gold answers from its records (any source), in order."""
  if name not in _SPECS:
    raise DatasetError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
  question_key, gold_fn = _SPECS[name]
  out = []
  for i, (path, lineno, record) in enumerate(records):
    question = _field(path, lineno, record, question_key, (str,))
    out.append(Example(question=question, answer=gold_fn(path, lineno, record), source=name, index=i))
  return out


def load_benchmark(name: str, data_dir: str) -> list[Example]:
  """A benchmark's questions and gold answers, in file order."""
  return benchmark_examples(name, jsonl_records(benchmark_path(name, data_dir)))


def train_examples(
    records: Iterable[Record],
    where: str,
    source: str,
    question_key: str = "prompt",
    answer_key: str = "answer",
    answer_from_solution: bool = False,
) -> list[Example]:
  """Training questions from records of any source (`where` names it in messages).

  Records with an empty or null answer are dropped (and logged). With
  `answer_from_solution` the answer field holds a worked solution and the gold answer is
  its last `\\boxed{}`; a record without one is an error.
  """
  out, dropped = [], 0
  for i, (path, lineno, record) in enumerate(records):
    question = _field(path, lineno, record, question_key, (str,))
    answer = _field(path, lineno, record, answer_key, (str, int, float, type(None)))
    if isinstance(answer, float) and answer.is_integer():
      answer = int(answer)
    answer = "" if answer is None else str(answer).strip()
    if answer and answer_from_solution:
      box = extract_boxed(answer)
      if box is None:
        raise DatasetError(f"{path}:{lineno}: field {answer_key!r}: expected a \\boxed{{}} "
                           f"answer (data.answer_from_solution), found none")
      answer = box.strip()
    if not answer:
      dropped += 1
      continue
    out.append(Example(question=question, answer=answer, source=source, index=i))
  logging.info("%s: %d examples, %d dropped for an empty %r", where, len(out), dropped, answer_key)
  if not out:
    raise DatasetError(f"{where}: every record has an empty {answer_key!r}")
  return out


def load_train_jsonl(
    path: str,
    question_key: str = "prompt",
    answer_key: str = "answer",
    source: str | None = None,
    answer_from_solution: bool = False,
) -> list[Example]:
  """Training questions of a JSONL file (see `train_examples`).

  The defaults fit `math_lvl3to5_8k.jsonl` (`prompt`, `answer`); the multi-attempt
  reference's own copy uses `question`/`input` and `ground_truth_answer`.
  """
  source = source or os.path.splitext(os.path.basename(path))[0]
  return train_examples(jsonl_records(path), path, source, question_key, answer_key,
                        answer_from_solution)
