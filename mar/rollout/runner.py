"""Host driver of the jitted rollout: texts in, episodes (and host-side results) out.

Tokenizes the prompt texts, left-pads them into a fixed [B, P] bucket (rows beyond the
real batch get n_attempts = 0 and stay idle, so every call has the same shapes and the
program compiles once), runs the rollout, and hands back device episodes plus the
per-row responses the GRPO/LTE and evaluation code need on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mar.data.tokenizer import Tokenizer, feedback_table
from mar.models.config import QwenConfig
from mar.rollout import multi_attempt as ma
from mar.rollout.host import AttemptVerifier
from mar import sampling as sampling_lib
from mar.sampling import boxed_stop_predicate


@dataclasses.dataclass
class HostEpisodes:
  """Per-row host view of a rollout (only the first `n` real rows)."""

  responses: list[list[int]]  # action tokens of the whole episode, in order
  texts: list[str]  # decoded responses
  answers: list[str | None]  # extracted final answer of the last attempt
  correct: np.ndarray  # [n] bool: any attempt correct
  truncated: np.ndarray  # [n] bool
  reward: np.ndarray  # [n] float


class RolloutRunner:
  """Owns one compiled rollout program for a (batch size, prompt bucket, spec)."""

  def __init__(self, model_config: QwenConfig, tokenizer: Tokenizer, verifier,
               *, batch_size: int, prompt_len: int, max_attempts: int, token_budget: int,
               sampling, check_every: int = 1, hint_feedback_len: int = 0, mesh=None,
               decode_fn=None):
    self.tok = tokenizer
    self.batch_size, self.prompt_len = batch_size, prompt_len
    fb_tokens, fb_lengths = feedback_table(tokenizer, max_attempts)
    self.feedback = (jnp.asarray(fb_tokens), jnp.asarray(fb_lengths))
    self.spec = ma.RolloutSpec(
        max_attempts=max_attempts,
        token_budget=token_budget,
        cache_len=ma.cache_len_for(prompt_len, token_budget, max_attempts,
                                   max(fb_tokens.shape[1], hint_feedback_len)),
        sampling=sampling,
        stop_ids=(tokenizer.im_end_id, tokenizer.eos_id),
        check_every=check_every,
        hint_feedback_len=hint_feedback_len,
    )
    self.verify_fn = AttemptVerifier(tokenizer, verifier)
    strings = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    self.stop_predicate = boxed_stop_predicate(strings)
    self.mesh = mesh
    spec, pred, vfn = self.spec, self.stop_predicate, self.verify_fn
    decode = decode_fn or sampling_lib.decode  # tests pass a scripted policy here
    self._rollout = jax.jit(lambda params, *args: ma.rollout(
        model_config, params, spec, pred, vfn, *args, decode_fn=decode))

  def fits(self, prompt: str) -> bool:
    """Whether a prompt text fits the prompt bucket."""
    return len(self.tok.encode(prompt)) <= self.prompt_len

  def encode_prompts(self, prompts: Sequence[str]):
    """Left-pads tokenized prompts into [B, P] (+ mask); raises if a prompt is too long."""
    b, p = self.batch_size, self.prompt_len
    if len(prompts) > b:
      raise ValueError(f"{len(prompts)} prompts for a rollout batch of {b}")
    tokens = np.full((b, p), self.tok.pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, text in enumerate(prompts):
      ids = self.tok.encode(text)
      if len(ids) > p:
        raise ValueError(f"prompt {i} has {len(ids)} tokens > prompt_len {p}: "
                         f"{text[:80]!r}...")
      tokens[i, p - len(ids):] = ids
      mask[i, p - len(ids):] = True
    return tokens, mask

  def run(self, params, prompts: Sequence[str], answers: Sequence[str],
          n_attempts: Sequence[int], key) -> ma.Episodes:
    """Runs one batch; rows past len(prompts) are idle padding."""
    n = len(prompts)
    tokens, mask = self.encode_prompts(prompts)
    attempts = np.zeros(self.batch_size, np.int32)
    attempts[:n] = n_attempts
    self.verify_fn.set_answers(list(answers) + [""] * (self.batch_size - n))
    return self._rollout(params, tokens, mask, attempts, np.arange(self.batch_size, dtype=np.int32),
                         *self.feedback, key)

  def to_host(self, episodes: ma.Episodes, n: int) -> HostEpisodes:
    """Responses, answers and outcomes of the first n rows, as numpy / Python objects."""
    from mar import verify  # host-only dependency

    tokens = np.asarray(episodes.tokens)
    action = np.asarray(episodes.action_mask)
    attempt = np.asarray(episodes.attempt_id)
    responses, texts, answers = [], [], []
    for b in range(n):
      responses.append(tokens[b][action[b]].tolist())
      texts.append(self.tok.decode(responses[-1]))
      last = attempt[b].max()
      last_text = self.tok.decode(tokens[b][action[b] & (attempt[b] == last)].tolist())
      answers.append(verify.extract_boxed(last_text) if last else None)
    return HostEpisodes(
        responses=responses,
        texts=texts,
        answers=answers,
        correct=np.asarray(episodes.correct_turn).any(0)[:n],
        truncated=np.asarray(episodes.truncated)[:n],
        reward=np.asarray(episodes.reward)[:n],
    )

  def run_host(self, params, prompts: Sequence[str], answers: Sequence[str], key,
               n_attempts: Sequence[int] | None = None) -> HostEpisodes:
    """Any number of prompts, in batch-sized chunks; returns the concatenated host view."""
    n_attempts = [1] * len(prompts) if n_attempts is None else list(n_attempts)
    parts = []
    for c, lo in enumerate(range(0, len(prompts), self.batch_size)):
      hi = min(lo + self.batch_size, len(prompts))
      ep = self.run(params, prompts[lo:hi], answers[lo:hi], n_attempts[lo:hi],
                    jax.random.fold_in(key, c))
      parts.append(self.to_host(ep, hi - lo))
    return HostEpisodes(
        responses=[r for p in parts for r in p.responses],
        texts=[t for p in parts for t in p.texts],
        answers=[a for p in parts for a in p.answers],
        correct=np.concatenate([p.correct for p in parts]),
        truncated=np.concatenate([p.truncated for p in parts]),
        reward=np.concatenate([p.reward for p in parts]),
    )
