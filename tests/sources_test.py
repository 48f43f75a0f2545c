"""Data sources behind config.data.train: JSONL, Parquet (file, HF shard folder), tfds:.

The same 200 training records read from each give the same Examples in the same order;
TFDS is read without TensorFlow; bad input names the source, record and field.
"""

import json
import os
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import pyarrow as pa
import pyarrow.parquet as pq
import testutil

from configs import demo as demo_config
from mar import config_utils, defaults, setup, wandb_sink
from mar.data import datasets, sources, tfds_math
from mar.verify.extract import extract_boxed

TRAIN = os.path.join(testutil.DATA_DIR, "train", "math_lvl3to5_8k.jsonl")


def first_records(path: str, n: int) -> list[dict]:
  return [r for _, r in zip(range(n), (r for _, r in datasets.read_jsonl(path)))]


def write_parquet(path: str, records: list[dict]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(records), path)
  return path


class SameExamplesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.records = first_records(TRAIN, 200)
    jsonl = os.path.join(cls.root, "train", "math_lvl3to5_8k.jsonl")
    os.makedirs(os.path.dirname(jsonl))
    with open(jsonl, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in cls.records)
    cls.specs = {"jsonl": jsonl}
    cls.specs["parquet"] = write_parquet(os.path.join(cls.root, "math_lvl3to5_8k.parquet"),
                                         cls.records)
    # HF datasets layout: two train shards and a test split the trainer must not read.
    hf = os.path.join(cls.root, "math_lvl3to5_8k")
    write_parquet(os.path.join(hf, "data", "train-00000-of-00002.parquet"), cls.records[:120])
    write_parquet(os.path.join(hf, "data", "train-00001-of-00002.parquet"), cls.records[120:])
    write_parquet(os.path.join(hf, "data", "test-00000-of-00001.parquet"), cls.records[:5])
    cls.specs["parquet_folder"] = hf
    cls.tfds_dir = os.path.join(cls.root, "tfds")
    tfds_math.build(["math_lvl3to5_8k"], data_dir=cls.tfds_dir, source_dir=cls.root)
    cls.specs["tfds"] = "tfds:mar_math/math_lvl3to5_8k"

  def load(self, kind, **kw):
    return sources.load_train(self.specs[kind], tfds_dir=self.tfds_dir, **kw)

  def test_every_source_gives_the_same_examples_in_order(self):
    want = [datasets.Example(r["prompt"], r["answer"].strip(), "math_lvl3to5_8k", i)
            for i, r in enumerate(self.records) if r["answer"].strip()]
    self.assertGreater(len(want), 190)
    for kind in self.specs:
      with self.subTest(kind):
        self.assertEqual(self.load(kind), want)

  def test_tfds_reads_without_tensorflow(self):
    self.load("tfds")
    self.assertNotIn("tensorflow", sys.modules)

  def test_trainer_reads_a_tfds_set_by_name(self):
    c = demo_config.get_config()
    c.data.synthetic.enabled = False
    c.data.update(dict(train=self.specs["tfds"], tfds_dir=self.tfds_dir))
    self.assertEqual(setup.load_train_data(c), self.load("jsonl"))

  def test_unbuilt_tfds_set_says_how_to_build_it(self):
    with self.assertRaisesRegex(datasets.DatasetError,
                                r"tfds:mar_math/gsm8k:test.*python -m mar.data.tfds_math"):
      sources.load_benchmark("gsm8k", "", "tfds:mar_math/gsm8k:test", self.tfds_dir)


class BenchmarksFromTfdsTest(absltest.TestCase):

  def test_every_benchmark_via_tfds_equals_jsonl(self):
    tfds_dir = tempfile.mkdtemp()
    tfds_math.build(list(datasets.BENCHMARKS), data_dir=tfds_dir, source_dir=testutil.DATA_DIR)
    c = defaults.base_config()
    c.data.update(dict(dir=testutil.DATA_DIR, tfds_dir=tfds_dir))
    self.assertEqual(set(c.data.benchmarks), set(datasets.BENCHMARKS))
    for name in datasets.BENCHMARKS:
      c.data.benchmarks[name] = f"tfds:mar_math/{name}:test"
      with self.subTest(name):
        self.assertEqual(sources.load_benchmark_from_config(name, c.data),
                         datasets.load_benchmark(name, testutil.DATA_DIR))


class FieldsAndErrorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.enterContext(tempfile.TemporaryDirectory())

  def test_answer_from_solution_takes_the_last_box(self):
    rows = [{"q": "1+1?", "sol": "so \\boxed{3} no, \\boxed{2}"},
            {"q": "2+2?", "sol": "\\boxed{\\frac{8}{2}}"}]
    path = write_parquet(os.path.join(self.dir, "s.parquet"), rows)
    got = sources.load_train(path, question_key="q", answer_key="sol", answer_from_solution=True)
    self.assertEqual([(e.question, e.answer) for e in got],
                     [("1+1?", "2"), ("2+2?", extract_boxed(rows[1]["sol"]))])
    rows.append({"q": "3+3?", "sol": "six"})
    path = write_parquet(os.path.join(self.dir, "t.parquet"), rows)
    with self.assertRaisesRegex(datasets.DatasetError, r"t\.parquet:record 2: field 'sol'.*boxed"):
      sources.load_train(path, question_key="q", answer_key="sol", answer_from_solution=True)

  def test_bad_parquet_input_names_file_record_and_field(self):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": None,
                                                                             "answer": "3"}]
    path = write_parquet(os.path.join(self.dir, "bad.parquet"), rows)
    with self.assertRaisesRegex(datasets.DatasetError,
                                r"bad\.parquet:record 2: field 'prompt': expected str, found NoneType"):
      sources.load_train(path)
    with self.assertRaisesRegex(datasets.DatasetError,
                                r"bad\.parquet: field 'problem': missing \(columns are"):
      sources.load_train(path, question_key="problem")
    with open(os.path.join(self.dir, "junk.parquet"), "w") as f:
      f.write("not parquet")
    with self.assertRaisesRegex(datasets.DatasetError, r"junk\.parquet: not a readable Parquet"):
      sources.load_train(os.path.join(self.dir, "junk.parquet"))

  def test_missing_optional_package_names_the_source_and_requirements_extras(self):
    path = write_parquet(os.path.join(self.dir, "p.parquet"), [{"prompt": "a", "answer": "1"}])
    hidden = {"pyarrow": None, "pyarrow.parquet": None, "tensorflow_datasets": None, "wandb": None}
    with mock.patch.dict(sys.modules, hidden):
      with self.assertRaisesRegex(config_utils.ConfigError,
                                  r"Parquet source .*p\.parquet needs the optional package 'pyarrow'"
                                  r".*pip install -r requirements-extras\.txt"):
        sources.load_train(path)
      with self.assertRaisesRegex(config_utils.ConfigError,
                                  r"TFDS source tfds:mar_math/x needs .*'tensorflow_datasets'"
                                  r".*requirements-extras\.txt"):
        sources.load_train("tfds:mar_math/x")
      with self.assertRaisesRegex(config_utils.ConfigError,
                                  r"config\.metrics\.wandb needs .*'wandb'.*requirements-extras"):
        wandb_sink.WandbSink(self.dir, {}, "p", read_rows=lambda path: [])
    self.assertLen(sources.load_train(path), 1)  # installed again: reads as before

  def test_specs(self):
    self.assertEqual(sources.parse_tfds("tfds:mar_math/math500:test"), ("mar_math/math500", "test"))
    self.assertEqual(sources.parse_tfds("tfds:squad"), ("squad", "train"))
    self.assertEqual(sources.source_name("tfds:mar_math/math500:test"), "math500")
    with self.assertRaisesRegex(datasets.DatasetError, "no such file"):
      sources.load_train(os.path.join(self.dir, "missing.parquet"))
    # A folder of splits without 'train' asks for a glob.
    write_parquet(os.path.join(self.dir, "x", "test-00000-of-00001.parquet"), [{"a": 1}])
    write_parquet(os.path.join(self.dir, "x", "validation-00000-of-00001.parquet"), [{"a": 1}])
    with self.assertRaisesRegex(datasets.DatasetError, "none is 'train'; give a glob"):
      sources.parquet_files(os.path.join(self.dir, "x"))
    glob_spec = os.path.join(self.dir, "x", "test-*.parquet")
    self.assertLen(sources.parquet_files(glob_spec), 1)


if __name__ == "__main__":
  absltest.main()
