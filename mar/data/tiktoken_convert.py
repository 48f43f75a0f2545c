"""Convert a tiktoken BPE file (e.g. Qwen's `qwen.tiktoken`) to an HF `tokenizer.json`.

Qwen2/2.5/3 share one base vocabulary of 151,643 byte-level BPE ranks. Given the
ranks, Qwen2's pre-tokenizer split pattern and the special tokens appended from
id 151643, the HF tokenizer encodes exactly as tiktoken does. The tests use this
to get the real Qwen vocabulary offline; nothing calls it at run time.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenizer regex (digits split one by one).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  mapping = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in mapping:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """`base64-token rank` lines -> {token bytes: rank}."""
  ranks = {}
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"{path}:{lineno}: expected 'base64 rank', found {line[:80]!r}")
      ranks[base64.b64decode(parts[0])] = int(parts[1])
  return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """Every split of every token into two tokens, ordered by the merged token's rank.

  Byte-level BPE then merges, at each step, the adjacent pair whose concatenation
  has the lowest rank: tiktoken's rule.
  """
  found = []
  for token, rank in ranks.items():
    if len(token) < 2:
      continue
    splits = [
        (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    ]
    splits.sort()
    found.extend((rank, rl, rr, left, right) for rl, rr, left, right in splits)
  found.sort()
  return [(left, right) for _, _, _, left, right in found]


def tiktoken_to_hf(
    tiktoken_path: str,
    out_dir: str,
    *,
    pattern: str = QWEN2_SPLIT_PATTERN,
    special_tokens: Sequence[str] = QWEN2_SPECIAL_TOKENS,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
) -> str:
  """Writes `out_dir/tokenizer.json` (+ `tokenizer_config.json`); returns out_dir.

  Special tokens get ids from len(ranks) upward, in the order given.
  """
  ranks = load_tiktoken_ranks(tiktoken_path)
  enc = bytes_to_unicode()
  to_str = lambda b: "".join(enc[x] for x in b)
  vocab = {to_str(tok): rank for tok, rank in ranks.items()}
  merges = [(to_str(a), to_str(b)) for a, b in _merges(ranks)]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
          pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
      ]
  )
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in special_tokens]
  )
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": eos_token,
      "pad_token": pad_token,
      "model_max_length": 32768,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out_dir
