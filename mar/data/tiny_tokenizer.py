"""A tiny byte-level BPE tokenizer for the demo, trained locally in a second.

Same machinery as Qwen's (Qwen2 split pattern, byte-level BPE, ChatML specials) so
the demo exercises the real code paths, but with a vocabulary of a few hundred
ids learned from the prompt texts and synthetic arithmetic. Nothing downloads.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mar.data import prompts
from mar.data import synthetic
from mar.data.tiktoken_convert import QWEN2_SPLIT_PATTERN

SPECIAL_TOKENS = (prompts.ENDOFTEXT, prompts.IM_START, prompts.IM_END)


def default_corpus(num_examples: int = 2000, seed: int = 0) -> list[str]:
  """Prompt and feedback texts plus arithmetic questions with boxed answers."""
  texts = []
  examples = synthetic.make_arithmetic_examples(num_examples, seed=seed, max_digits=3, num_operands=3)
  for i, ex in enumerate(examples):
    n = i % 5 + 1
    prompt = prompts.multi_attempt_prompt(ex.question, n) if i % 2 else prompts.single_turn_prompt(ex.question)
    texts.append(prompt + f"The answer is \\boxed{{{ex.answer}}}." + prompts.feedback_text(n))
  return texts


def build_tiny_tokenizer(
    out_dir: str,
    corpus_texts: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> str:
  """Trains the tokenizer and writes `out_dir/tokenizer.json` (+ config); returns out_dir.

  Deterministic: the same corpus and vocab_size give byte-identical files.
  """
  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
  texts = list(default_corpus() if corpus_texts is None else corpus_texts)
  tok = tokenizers.Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
      ]
  )
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      special_tokens=[tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  # Special tokens must not be learned from as text: train on the pieces between them.
  pieces = []
  for t in texts:
    for special in SPECIAL_TOKENS:
      t = t.replace(special, "\x00")
    pieces.extend(p for p in t.split("\x00") if p)
  tok.train_from_iterator(sorted(pieces), trainer=trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": None,
      "eos_token": prompts.ENDOFTEXT,
      "pad_token": prompts.ENDOFTEXT,
      "model_max_length": 4096,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out_dir
