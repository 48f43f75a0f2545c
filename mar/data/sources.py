"""Where training and benchmark records come from: JSONL, Parquet or TFDS, by one spec string.

`config.data.train` and `config.data.benchmarks.<name>` take:
  path.jsonl                      one JSON object per line
  path.parquet | DIR | GLOB       Parquet (pyarrow): a file, every `*.parquet` below DIR in
                                  name order, or a glob. A folder in HF `datasets` layout
                                  (`data/train-00000-of-00004.parquet`, `test-...`) gives its
                                  `train` split; point a glob at another split's shards.
  tfds:NAME[/CONFIG][:SPLIT]      a prepared TFDS dataset (split default `train`), read with
                                  `tfds.data_source` (array_record, random access): no TensorFlow.
                                  `config.data.tfds_dir` is its data_dir; mar's own math sets
                                  are `tfds:mar_math/<set>` (mar.data.tfds_math).
Every source yields the same (where, record label, fields) triples, so field mapping, gold
rules and error messages (source, record, field) are the JSONL ones of mar.data.datasets.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Iterator, Sequence

from mar import config_utils
from mar.data import datasets
from mar.data.datasets import DatasetError, Example, Record

TFDS_PREFIX = "tfds:"
# HF datasets shard names: <split>-00000-of-00004.parquet
_HF_SHARD = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}\.parquet$")
_BATCH_ROWS = 1024


def is_tfds(spec: str) -> bool:
  return spec.startswith(TFDS_PREFIX)


def parse_tfds(spec: str) -> tuple[str, str]:
  """`tfds:NAME[/CONFIG][:SPLIT]` -> ("NAME[/CONFIG]", SPLIT)."""
  body = spec[len(TFDS_PREFIX):]
  name, _, split = body.partition(":")
  if not name or (split == "" and body.endswith(":")):
    raise DatasetError(f"{spec!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
  return name, split or "train"


def source_name(spec: str) -> str:
  """The `Example.source` of a spec: the file or folder stem, or the TFDS config (else name)."""
  if is_tfds(spec):
    return parse_tfds(spec)[0].split("/")[-1]
  return os.path.splitext(os.path.basename(os.path.normpath(spec)))[0]


def check_exists(spec: str) -> None:
  """Fails early, naming the spec, when a file source is missing (TFDS is checked on read)."""
  if is_tfds(spec) or "://" in spec:
    return
  if not (os.path.exists(spec) or glob.glob(spec)):
    raise DatasetError(f"{spec}: no such file, folder or glob match")


# ----- reading records ---------------------------------------------------------------------


def read_records(spec: str, tfds_dir: str = "",
                 columns: Sequence[str] | None = None) -> Iterator[Record]:
  """(where, record label, fields) for every record of the source, in its order.

  `columns` limits what Parquet reads (other sources read whole records).
  """
  if is_tfds(spec):
    return _tfds_records(spec, tfds_dir)
  if spec.endswith(".parquet") or os.path.isdir(spec) or glob.has_magic(spec):
    return _parquet_records(parquet_files(spec), columns)
  return datasets.jsonl_records(spec)  # any other file is JSON lines


def parquet_files(spec: str) -> list[str]:
  """The Parquet files of a file, folder (HF layout: its train split) or glob spec."""
  if os.path.isfile(spec):
    return [spec]
  if os.path.isdir(spec):
    files = sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
    if not files:
      raise DatasetError(f"{spec}: no *.parquet files in this folder")
    return _one_split(spec, files)
  files = sorted(glob.glob(spec))
  if not files:
    raise DatasetError(f"{spec}: no such file, folder or glob match")
  return files


def _split_of(path: str) -> str | None:
  m = _HF_SHARD.match(os.path.basename(path))
  if m:
    return m.group("split")
  parent = os.path.basename(os.path.dirname(path))
  return parent if parent in ("train", "test", "validation") else None


def _one_split(folder: str, files: list[str]) -> list[str]:
  """HF layout folders hold several splits: training reads `train`."""
  splits = {_split_of(f) for f in files}
  if len(splits) <= 1:
    return files
  if "train" not in splits:
    names = sorted(s or "(unnamed)" for s in splits)
    raise DatasetError(f"{folder}: Parquet shards of several splits {names} and none is "
                       f"'train'; give a glob such as {os.path.join(folder, '**', 'test-*.parquet')}")
  return [f for f in files if _split_of(f) == "train"]


def _parquet_records(files: list[str], columns: Sequence[str] | None) -> Iterator[Record]:
  pq = config_utils.import_optional("pyarrow.parquet", f"Parquet source {files[0]}")

  for path in files:
    try:
      handle = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types: name the file
      raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
    names = handle.schema_arrow.names
    wanted = None
    if columns is not None:
      missing = [c for c in columns if c not in names]
      if missing:
        raise DatasetError(f"{path}: field {missing[0]!r}: missing (columns are {names})")
      wanted = list(dict.fromkeys(columns))
    row = 0
    for batch in handle.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
      for record in batch.to_pylist():
        yield path, f"record {row}", record
        row += 1


def _tfds_records(spec: str, tfds_dir: str) -> Iterator[Record]:
  tfds = config_utils.import_optional("tensorflow_datasets", f"TFDS source {spec}")

  name, split = parse_tfds(spec)
  if name.split("/")[0] == "mar_math":
    from mar.data import tfds_math  # pylint: disable=g-import-not-at-top,unused-import  (registers it)
  try:
    # download=False: nothing downloads or builds at run time; a missing set is an error.
    source = tfds.data_source(name, split=split, data_dir=tfds_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  (not built, unknown name or split)
    hint = ""
    if name.startswith("mar_math"):
      hint = (f"; build it with `python -m mar.data.tfds_math --configs={name.split('/')[-1]}"
              f"{' --data_dir=' + tfds_dir if tfds_dir else ''}`")
    raise DatasetError(f"{spec}: cannot open the TFDS split ({type(e).__name__}: "
                       f"{str(e)[:300]}){hint}") from None
  for start in range(0, len(source), _BATCH_ROWS):  # batched random access: one read per chunk
    rows = range(start, min(start + _BATCH_ROWS, len(source)))
    for i, record in zip(rows, source.__getitems__(list(rows))):
      yield spec, f"record {i}", config_utils.to_jsonable(record, spec)


# ----- Examples ----------------------------------------------------------------------------


def load_train(spec: str, question_key: str = "prompt", answer_key: str = "answer",
               answer_from_solution: bool = False, tfds_dir: str = "") -> list[Example]:
  """Training `Example`s of any source; index = record number, source = `source_name`."""
  check_exists(spec)
  records = read_records(spec, tfds_dir, columns=(question_key, answer_key))
  return datasets.train_examples(records, spec, source_name(spec), question_key, answer_key,
                                 answer_from_solution)


def load_benchmark(name: str, data_dir: str, spec: str = "", tfds_dir: str = "") -> list[Example]:
  """Benchmark `name` from `spec`, or from `<data_dir>/<name>/test.jsonl` when empty."""
  if not spec:
    return datasets.load_benchmark(name, data_dir)
  check_exists(spec)
  return datasets.benchmark_examples(name, read_records(spec, tfds_dir))


def load_benchmark_from_config(name: str, data_config) -> list[Example]:
  """`load_benchmark` with `config.data`'s per-benchmark override and TFDS folder."""
  overrides = data_config.get("benchmarks") or {}
  return load_benchmark(name, data_config.dir, overrides.get(name, ""),
                        data_config.get("tfds_dir", ""))
