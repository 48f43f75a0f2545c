"""Tokenizers from a local HF folder, and the pre-tokenized feedback table.

Special ids always come from the tokenizer file, never from constants: the tiny
demo tokenizer and Qwen's put `<|im_start|>` at different ids.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import tokenizers

from mar.data import prompts


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ChatML special ids the rollout needs."""

  def __init__(self, tok: tokenizers.Tokenizer, pad_token: str | None = None):
    self._tok = tok
    self.im_start_id = self._special_id(prompts.IM_START)
    self.im_end_id = self._special_id(prompts.IM_END)
    self.eos_id = self._special_id(prompts.ENDOFTEXT)
    self.pad_id = self._special_id(pad_token) if pad_token else self.eos_id

  @classmethod
  def from_dir(cls, path: str) -> "Tokenizer":
    """Loads `path/tokenizer.json`; `tokenizer_config.json`'s pad_token if present."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
      raise FileNotFoundError(f"{tok_file}: no tokenizer.json in the tokenizer folder")
    tok = tokenizers.Tokenizer.from_file(tok_file)
    pad = None
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
      with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
      pad = cfg.get("pad_token")
      if isinstance(pad, dict):  # {"content": "<|endoftext|>", ...}
        pad = pad.get("content")
    return cls(tok, pad)

  def _special_id(self, token: str) -> int:
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise ValueError(f"tokenizer has no special token {token!r}")
    return tid

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def hf(self) -> tokenizers.Tokenizer:
    return self._tok

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; no BOS added; special tokens in the text become special ids."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens kept."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)


def feedback_table(tok: Tokenizer, max_attempts: int) -> tuple[np.ndarray, np.ndarray]:
  """Feedback turns, pre-tokenized for appending on device.

  Returns (tokens int32 [max_attempts, L], lengths int32 [max_attempts]): row n
  holds `feedback_text(n)` (n attempts left), right-padded with `pad_id`; row 0 is
  empty (an episode with no attempts left gets no feedback).
  """
  if max_attempts < 1:
    raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
  rows = [[]] + [tok.encode(prompts.feedback_text(n)) for n in range(1, max_attempts)]
  width = max(1, max(len(r) for r in rows))
  tokens = np.full((max_attempts, width), tok.pad_id, dtype=np.int32)
  lengths = np.zeros((max_attempts,), dtype=np.int32)
  for n, row in enumerate(rows):
    tokens[n, : len(row)] = row
    lengths[n] = len(row)
  return tokens, lengths
