"""TFDS builder of mar's math sets (the JSONL files of `../shared/data`), TensorFlow-free.

  python -m mar.data.tfds_math [--configs=math_lvl3to5_8k,math500] [--data_dir=DIR] \
      [--source_dir=../shared/data]

then train on `--config.data.train=tfds:mar_math/math_lvl3to5_8k` (benchmarks:
`--config.data.benchmarks.math500=tfds:mar_math/math500:test`). Where TensorFlow is
installed, `tfds build mar/data/tfds_math.py --manual_dir=../shared/data` runs the same
builder (the `tfds` command of tensorflow-datasets 4.9 imports TensorFlow; this module's
command does not). One config per file; records keep the JSONL field names and file order
(no shuffling, key = line), so the same question/answer keys and gold rules apply and the
Examples equal the JSONL ones. Files are array_record (random access through
`tfds.data_source`). A JSON null in a text field is stored as "" (the loaders drop empty
answers either way).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mar.data import datasets

# The repository's sibling data folder (the default when no manual_dir is given).
DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                              "shared", "data")

_FEATURES = {
    "text": tfds.features.Text,
    "int": lambda: tfds.features.Scalar(dtype=np.int64),
    "float": lambda: tfds.features.Scalar(dtype=np.float64),
    "texts": lambda: tfds.features.Sequence(tfds.features.Text()),
}

# config name: (file under the data folder, split, {field: kind}, description)
# fmt: off
SETS = {
    "math_lvl3to5_8k": ("train/math_lvl3to5_8k.jsonl", "train",
                        {"id": "text", "prompt": "text", "answer": "text", "source": "text"},
                        "SimpleRL MATH level 3-5 (8,523 problems)"),
    "math_train_deepscaler": ("train/math_train_deepscaler.jsonl", "train",
                              {"problem": "text", "answer": "text", "difficulty": "float",
                               "type": "text"},
                              "MATH train split with levels (7,474 problems)"),
    "math500": ("benchmarks/math500/test.jsonl", "test",
                {"problem": "text", "solution": "text", "answer": "text", "subject": "text",
                 "level": "int", "unique_id": "text"}, "MATH-500"),
    "aime24": ("benchmarks/aime24/test.jsonl", "test",
               {"id": "int", "problem": "text", "answer": "text"}, "AIME 2024"),
    "aime25": ("benchmarks/aime25/test.jsonl", "test",
               {"id": "text", "problem": "text", "answer": "text"}, "AIME 2025"),
    "amc23": ("benchmarks/amc23/test.jsonl", "test",
              {"id": "int", "problem": "text", "answer": "float"}, "AMC 2023"),
    "minerva_math": ("benchmarks/minerva_math/test.jsonl", "test",
                     {"idx": "int", "problem": "text", "solution": "text", "type": "text"},
                     "Minerva math"),
    "olympiadbench": ("benchmarks/olympiadbench/test.jsonl", "test",
                      {"id": "int", "question": "text", "final_answer": "texts",
                       "subfield": "text"}, "OlympiadBench (OE_TO_maths_en_COMP)"),
    "gsm8k": ("benchmarks/gsm8k/test.jsonl", "test",
              {"idx": "int", "question": "text", "answer": "text"}, "GSM8K test"),
}
# fmt: on

_TYPES = {"text": (str, type(None)), "int": (int,), "float": (int, float),
          "texts": (list,)}


class MarMath(tfds.core.GeneratorBasedBuilder):
  """mar's math training sets and benchmarks, one builder config per JSONL file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The JSONL files of shared/data (see their SOURCE.md)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=desc)
                     for name, (_, _, _, desc) in SETS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass --manual_dir=<the shared data folder holding train/ and benchmarks/>; "
      "without it the repository's ../shared/data is read.")

  def __init__(self, *, file_format: str | None = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    _, _, fields, _ = SETS[self.builder_config.name]
    features = tfds.features.FeaturesDict({k: _FEATURES[v]() for k, v in fields.items()})
    return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                 features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    path, split, _, _ = SETS[self.builder_config.name]
    return {split: self._generate_examples(os.path.join(_source_dir(dl_manager), path))}

  def _generate_examples(self, path):
    _, _, fields, _ = SETS[self.builder_config.name]
    for lineno, record in datasets.read_jsonl(path):
      yield lineno, _features(path, lineno, record, fields)


def _source_dir(dl_manager) -> str:
  try:
    manual = dl_manager.manual_dir
  except AssertionError:  # tfds asserts when no manual_dir was configured
    manual = None
  if manual is not None and os.path.isdir(os.fspath(manual)):
    return os.fspath(manual)
  return os.environ.get("MAR_DATA_DIR", DEFAULT_SOURCE)


def _features(path: str, lineno: int, record: dict, fields: dict) -> dict:
  """The record's declared fields, type-checked; errors name file, line and field."""
  out = {}
  for key, kind in fields.items():
    if key not in record:
      raise datasets.DatasetError(f"{path}:{lineno}: field {key!r}: missing "
                                  f"(record has {sorted(record)})")
    value = record[key]
    if not isinstance(value, _TYPES[kind]) or isinstance(value, bool):
      raise datasets.DatasetError(f"{path}:{lineno}: field {key!r}: expected {kind}, "
                                  f"found {type(value).__name__}")
    out[key] = "" if value is None else value
  return out


def build(configs=None, data_dir: str = "", source_dir: str = "") -> list[str]:
  """Prepares the given configs (all by default) under `data_dir`; returns their folders."""
  out = []
  for name in configs or SETS:
    if name not in SETS:
      raise ValueError(f"unknown mar_math config {name!r}; expected one of {sorted(SETS)}")
    builder = MarMath(config=name, data_dir=data_dir or None)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir or None))
    logging.info("mar_math/%s: %s", name, builder.data_dir)
    out.append(os.fspath(builder.data_dir))
  return out


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  build(f.configs, f.data_dir, f.source_dir)


if __name__ == "__main__":
  flags.DEFINE_list("configs", None, f"Configs to build (default: all of {sorted(SETS)}).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir (default: TFDS's, ~/tensorflow_datasets).")
  flags.DEFINE_string("source_dir", "", "Folder with train/ and benchmarks/ (default: "
                      "$MAR_DATA_DIR or the repository's ../shared/data).")
  app.run(_main)
