"""The embedded demo's model: a tiny Qwen3 + tokenizer, warm-started on synthetic dialogues.

`ensure_demo_model` builds (once per workdir) an HF-format folder with a byte-level BPE
tokenizer and a 2-layer Qwen3, trained briefly with supervised learning on multi-attempt
arithmetic dialogues in the exact METHODS.md format: some first attempts are wrong, then the
feedback turn, then a correct retry (a "careless first guess" habit that RL must unlearn,
see configs/demo.py). Everything after it (rollout, verifier,
PPO/GRPO, checkpoints, evaluation) is the real pipeline, loading this folder like any
checkpoint.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mar import models
from mar.data import prompts, synthetic
from mar.data.tiny_tokenizer import build_tiny_tokenizer
from mar.data.tokenizer import Tokenizer
from mar.lte import hints
from mar.metrics import progress
from mar.rl import optim, scoring
from mar.rl.update import make_update_step


def demo_model_config(vocab_size: int) -> models.QwenConfig:
  return models.QwenConfig(
      model_type="qwen3", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
      tie_word_embeddings=True, max_position_embeddings=512)


def _attempt(answer) -> str:
  return f"\\boxed{{{answer}}}"


def _wrong(answer: int, rng: np.random.Generator, deltas) -> int:
  return answer + int(rng.choice(list(deltas)))


def sft_dialogue(tok: Tokenizer, ex, n_attempts: int, first_wrong: bool, rng, style: str,
                 deltas=(1,)):
  """Token ids and loss mask of one warm-start dialogue."""
  if style == "lte":
    # Half the dialogues show a hint naming the habitual wrong answer, answered correctly:
    # the rule LTE's hinted re-sampling can then discover and distil into the plain prompt.
    wrong = _wrong(int(ex.answer), rng, deltas)
    if rng.random() < 0.5:
      user, answer = hints.hint_prompt(ex.question, [str(wrong)], [False]), ex.answer
    else:
      user, answer = hints.plain_prompt(ex.question), wrong if first_wrong else ex.answer
    # The response ends with a trained EOS: LTE rollouts run to it (rollout.stop_at_box=False).
    return [(tok.encode(hints.chat_prompt(user)), False),
            (tok.encode(_attempt(answer) + prompts.IM_END), True)]
  prompt = (prompts.multi_attempt_prompt(ex.question, n_attempts) if style == "multi_attempt"
            else prompts.single_turn_prompt(ex.question))
  pieces = [(tok.encode(prompt), False)]
  if first_wrong:
    pieces.append((tok.encode(_attempt(_wrong(int(ex.answer), rng, deltas))), True))
    if n_attempts == 1:
      return pieces
    pieces.append((tok.encode(prompts.feedback_text(n_attempts - 1)), False))
  pieces.append((tok.encode(_attempt(ex.answer)), True))
  return pieces


def _pack(dialogues, length: int, pad_id: int):
  n = len(dialogues)
  tokens = np.full((n, length), pad_id, np.int32)
  valid = np.zeros((n, length), bool)
  target = np.zeros((n, length), bool)
  for i, pieces in enumerate(dialogues):
    at = 0
    for ids, is_target in pieces:
      ids = ids[: max(0, length - at)]
      tokens[i, at:at + len(ids)] = ids
      valid[i, at:at + len(ids)] = True
      target[i, at:at + len(ids)] = is_target
      at += len(ids)
  return tokens, valid, target


def sft_batch(tok, examples, max_attempts, p_wrong, seed, length, style, deltas=(1,)):
  rng = np.random.default_rng(seed)
  dialogues = [
      sft_dialogue(tok, ex, int(rng.integers(1, max_attempts + 1)), rng.random() < p_wrong,
                   rng, style, deltas) for ex in examples]
  return _pack(dialogues, length, tok.pad_id)


def warm_start(cfg, params, tok, config, seed: int):
  """A few hundred supervised steps (Adam) on freshly generated dialogues."""
  d = config.model.demo
  loss_fn = lambda p, mb: _sft_loss(cfg, p, mb)
  opt = optim.make_optimizer(d.sft_lr, d.sft_steps, warmup_ratio=0.05, b2=0.98)
  update = jax.jit(make_update_step(loss_fn, opt), donate_argnums=(0, 1))
  opt_state = opt.init(params)
  s = config.data.synthetic
  bar = progress(d.sft_steps, desc="demo warm start")
  for step in range(d.sft_steps):
    exs = synthetic.make_arithmetic_examples(d.sft_batch, seed + 1000 + step,
                                             min_digits=s.min_digits, max_digits=s.max_digits)
    tokens, valid, target = sft_batch(tok, exs, config.rollout.max_attempts, d.p_wrong,
                                      seed + step, d.sft_len, d.style, tuple(d.wrong_deltas))
    params, opt_state, m = update(params, opt_state,
                                  {"tokens": tokens, "valid": valid, "target": target})
    bar.update(1)
    bar.set_postfix(loss=float(m["loss"]))
  bar.close()
  return params


def _sft_loss(cfg, params, mb):
  logp = scoring.token_logprobs(cfg, params, mb["tokens"], mb["valid"])
  mask = mb["target"].astype(jnp.float32)
  loss = -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"loss": loss}


def ensure_demo_model(config, workdir: str) -> str:
  """Builds `<workdir>/demo_model` (tokenizer + warm-started tiny Qwen3) unless it exists."""
  path = os.path.join(workdir, "demo_model")
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    return path
  os.makedirs(path, exist_ok=True)
  s = config.data.synthetic
  corpus = [prompts.multi_attempt_prompt(ex.question, 2) + _attempt(ex.answer)
            for ex in synthetic.make_arithmetic_examples(
                2000, 7, min_digits=s.min_digits, max_digits=s.max_digits)]
  corpus += [prompts.feedback_text(n) for n in range(1, 6)]
  corpus += [hints.hint_prompt("1+1", ["3"], [False]), prompts.single_turn_prompt("1+1")]
  build_tiny_tokenizer(path, corpus_texts=corpus, vocab_size=config.model.demo.vocab_size)
  tok = Tokenizer.from_dir(path)
  cfg = demo_model_config(tok.vocab_size)
  params = models.init_params(cfg, jax.random.PRNGKey(config.seed))
  logging.info("demo: warm start of a %d-layer Qwen3 (vocab %d)", cfg.num_layers, tok.vocab_size)
  params = warm_start(cfg, params, tok, config, config.seed)
  models.save_hf(path, cfg, params)
  return path
