"""Trained params as an HF folder that transformers, vLLM and other harnesses load.

The library half of `python -m mar.tools.export_hf` (which reads a checkpoint leaf by leaf):
`export_params` writes params held in memory, `export_at_end` is the trainer's hook for
`config.export.at_end` (`RUN/hf/`). Both write `model.safetensors` (numbered shards plus an
index above `max_shard_size`), `config.json`, `generation_config.json` and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import jax

from mar.data.tokenizer import Tokenizer
from mar.models import hf_io
from mar.models.config import QwenConfig

# Tokenizer and chat files of an HF model folder, copied as they are when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"


def write_side_files(model_path: str, out: str) -> None:
  """Copies the tokenizer files; writes generation_config.json (copied if the source has one)."""
  if jax.process_index() != 0:
    return
  os.makedirs(out, exist_ok=True)
  for name in TOKENIZER_FILES + (GENERATION_CONFIG,):
    src = os.path.join(model_path, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out, name))
  if os.path.isfile(os.path.join(out, GENERATION_CONFIG)):
    return
  tok = Tokenizer.from_dir(model_path)
  # Chat turns end with <|im_end|>, base-model text with <|endoftext|>: stop at either.
  gen = {"eos_token_id": [tok.im_end_id, tok.eos_id], "pad_token_id": tok.pad_id}
  with open(os.path.join(out, GENERATION_CONFIG), "w", encoding="utf-8") as f:
    json.dump(gen, f, indent=2)


def export_params(model_path: str, params: Any, out: str, dtype: str = "bfloat16",
                  max_shard_size: int = hf_io.DEFAULT_MAX_SHARD_SIZE) -> str:
  """Writes trained `params` (on device, any sharding) as an HF folder; all hosts call."""
  cfg = QwenConfig.from_hf_dir(model_path)
  hf_io.save_hf(out, cfg, params, max_shard_size=max_shard_size, dtype=dtype)
  write_side_files(model_path, out)
  logging.info("exported the policy to %s (%s)", out, dtype)
  return out


def export_at_end(config, workdir: str, params: Any) -> str | None:
  """The end-of-training hook: `RUN/hf/` from the trained params when config.export.at_end."""
  e = config.export
  if not e.at_end:
    return None
  return export_params(config.model.path, params, os.path.join(workdir, "hf"), dtype=e.dtype,
                       max_shard_size=int(e.max_shard_size))
