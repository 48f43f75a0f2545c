"""Datasets (JSONL benchmarks, training sets, synthetic arithmetic), prompts, tokenizers."""

from mar.data.datasets import BENCHMARKS
from mar.data.datasets import DatasetError
from mar.data.datasets import EVAL_BENCHMARKS
from mar.data.datasets import Example
from mar.data.datasets import load_benchmark
from mar.data.datasets import load_train_jsonl
from mar.data.synthetic import make_arithmetic_examples
