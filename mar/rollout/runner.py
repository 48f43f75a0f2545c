"""Host driver of the jitted rollout: texts in, episodes (and host-side results) out.

Tokenizes the prompt texts, left-pads them into a [B, P] bucket (P: the smallest of a few
sizes, powers of two up to prompt_len, that holds the batch's longest prompt, so prefill and
the KV cache follow real prompt lengths; rows beyond the real batch get n_attempts = 0 and
stay idle, so the program compiles once per bucket), runs the rollout, and hands back device episodes plus the
per-row responses the GRPO/LTE and evaluation code need on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from mar import parallel
from mar.data.tokenizer import Tokenizer, feedback_table
from mar.models import model as qwen
from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig
from mar.rollout import continuous
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
  # The sampler's log-prob of each response token (aligned with `responses`): the
  # distribution it sampled from, at the sampling temperature (`mar.sampling.sample`).
  logprobs: list[np.ndarray] = dataclasses.field(default_factory=list)


def select_rows(host: HostEpisodes, rows) -> HostEpisodes:
  """The host view of `rows` (indices), in that order."""
  pick = lambda v: [v[i] for i in rows] if isinstance(v, list) else np.asarray(v)[rows]
  return HostEpisodes(*(pick(getattr(host, f.name)) for f in dataclasses.fields(host)))


_unstack = jax.jit(qwen.unstack_layers)  # no donation: a no-op reshard returns the input


def prompt_buckets(prompt_len: int, smallest: int = 64) -> tuple[int, ...]:
  """Prompt bucket sizes: powers of two from `smallest` below prompt_len, then prompt_len."""
  sizes, p = [], smallest
  while p < prompt_len:
    sizes.append(p)
    p *= 2
  return tuple(sizes) + (prompt_len,)


def queue_len(episodes: int, rows: int) -> int:
  """The continuous engine's queue for `episodes`: padded to a multiple of the rows (>= rows),
  so it compiles for a few queue lengths."""
  return rows * max(1, -(-episodes // rows))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `length` tokens."""
  for p in buckets:
    if length <= p:
      return p
  raise ValueError(f"a prompt of {length} tokens exceeds the largest bucket {buckets[-1]}")


class RolloutRunner:
  """Owns the compiled rollout programs for a (batch size, spec): one per prompt bucket.

  Each call pads its prompts to the smallest bucket (`prompt_buckets`: powers of two from 64,
  then prompt_len) that holds its longest prompt, and the dialogue slots shrink with it, so
  short prompts are not sampled at the longest one's cost.

  Single-turn rollouts (M = 1, no hybrid hints) are verified on the host after the program
  instead of in a callback inside it (`deferred`): `run_host` then verifies chunk c while
  the device samples chunk c + 1. On several hosts (`jax.distributed`) each host passes its
  own prompts (`batch_size / process_count` rows per call). Deferred rollouts run as one
  program on the global batch, and each host reads back and verifies only its rows.
  Multi-attempt rollouts run per host (`per_host`): each host gathers the policy onto its
  own devices and runs its rows there, verifying in the callback as on one host.
  """

  def __init__(self, model_config: QwenConfig, tokenizer: Tokenizer, verifier,
               *, batch_size: int, prompt_len: int, max_attempts: int, token_budget: int,
               sampling, check_every: int = 1, hint_feedback_len: int = 0, mesh=None,
               decode_fn=None, defer_verify: bool | None = None, timeline=None,
               stop_at_box: bool = True, sampling_mesh=None, sampling_dtype=None,
               engine: str = "static", refill_rows: int = 0, refill_wait: int = 16,
               verify_every: int = 8, choose_fn=None, feedback_text=None):
    self.tok = tokenizer
    self.model_config = model_config
    self.batch_size, self.prompt_len = batch_size, prompt_len
    self.processes = jax.process_count()
    if batch_size % self.processes:
      raise ValueError(f"rollout batch_size {batch_size} does not split over "
                       f"{self.processes} hosts")
    self.local_batch = batch_size // self.processes
    single_turn = max_attempts == 1 and not hint_feedback_len
    self.deferred = single_turn if defer_verify is None else defer_verify
    if self.deferred and not single_turn:
      raise ValueError("defer_verify needs a single-turn rollout (max_attempts=1, no hints)")
    # Multi-attempt rollouts on several hosts: the per-turn callback needs the whole batch
    # of its program on one host, so each host runs its own rows on its own devices.
    self.per_host = self.processes > 1 and not self.deferred
    self._host_params_cache: tuple = (None, None)
    fb_tokens, fb_lengths = feedback_table(tokenizer, max_attempts)
    self.feedback = (np.asarray(fb_tokens), np.asarray(fb_lengths))
    self._feedback_len = max(fb_tokens.shape[1], hint_feedback_len)
    self.buckets = prompt_buckets(prompt_len)
    self.spec = ma.RolloutSpec(
        max_attempts=max_attempts,
        token_budget=token_budget,
        cache_len=ma.cache_len_for(prompt_len, token_budget, max_attempts, self._feedback_len),
        sampling=sampling,
        stop_ids=(tokenizer.im_end_id, tokenizer.eos_id),
        check_every=check_every,
        hint_feedback_len=hint_feedback_len,
        # Run to EOS (verl, LTE): the single-turn response keeps its EOS as a trained action.
        keep_stop_token=single_turn and not stop_at_box,
    )
    self.verify_fn = AttemptVerifier(tokenizer, verifier, feedback_text=feedback_text)
    strings = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    # An attempt ends at its first closed \boxed{} only under multi-attempt's rule.
    self.stop_predicate = boxed_stop_predicate(strings) if stop_at_box else None
    self.mesh = mesh
    # The sampling layout: rows over sampling_mesh's 'data', weights in sampling_dtype over
    # its 'tensor', made from the training layout once per distinct params (`reshard_stats`).
    self.sampling_mesh, self.sampling_dtype = sampling_mesh, sampling_dtype
    self._sampling_params_cache: tuple = (None, None)
    self.reshard_stats: dict = {}
    self.timeline = timeline  # an overlap.DeviceTimeline, if the caller measures overlap
    self._decode_fn = decode_fn  # tests pass a scripted policy here
    self._rollouts: dict[int, object] = {}  # prompt bucket -> its jitted rollout
    # Prompt tokens computed by prefill vs real ones, since the runner was built.
    self.prefill_tokens = {"computed": 0, "real": 0}
    if engine not in ("static", "continuous"):
      raise ValueError(f"rollout engine: expected 'static' or 'continuous', found {engine!r}")
    self.continuous = engine == "continuous"
    # The continuous engine runs any number of prompts as one queue (padded to a multiple of
    # the rows, so it compiles for a few queue lengths and one program per prompt bucket);
    # one program over the global rows when deferred on several hosts, else this host's rows.
    self._engine_rows = self.local_batch if (self.per_host or self.processes == 1) else batch_size
    self._engine_args = dict(refill_rows=refill_rows, refill_wait=refill_wait,
                             verify_every=verify_every)
    self._choose_fn = choose_fn
    self._continuous: dict[tuple, object] = {}  # (prompt bucket, groups) -> its engine
    self._stats: list = []  # the engine's counters of each program since take_stats

  def spec_for(self, bucket: int) -> ma.RolloutSpec:
    """The rollout spec of one prompt bucket: its cache holds that bucket, not the largest."""
    return dataclasses.replace(self.spec, cache_len=ma.cache_len_for(
        bucket, self.spec.token_budget, self.spec.max_attempts, self._feedback_len))

  def _rollout_for(self, bucket: int):
    if bucket not in self._rollouts:
      spec, pred, decode = self.spec_for(bucket), self.stop_predicate, self._decode_fn
      if decode is None:  # the sampler, one decode loop per data shard of the layout
        mesh = self._local_mesh() if self.per_host else self.sampling_mesh
        decode = functools.partial(sampling_lib.decode, mesh=mesh)
      vfn = None if self.deferred else self.verify_fn
      self._rollouts[bucket] = jax.jit(lambda params, *args: ma.rollout(
          self.model_config, params, spec, pred, vfn, *args, decode_fn=decode))
    return self._rollouts[bucket]

  def fits(self, prompt: str) -> bool:
    """Whether a prompt text fits the largest prompt bucket."""
    return len(self.tok.encode(prompt)) <= self.prompt_len

  def encode_prompts(self, prompts: Sequence[str], rows: int | None = None,
                     per_row: bool = False):
    """Left-pads this host's tokenized prompts into [rows, P] (+ mask); rows = B / hosts.

    P is the smallest bucket that holds the longest prompt (on several hosts running one
    program, the longest of all hosts'). Raises if a prompt is longer than prompt_len.
    `per_row`: the program prefills each prompt at its own bucket (the continuous engine),
    which is what `prefill_tokens` counts, rather than rows x P.
    """
    b = self.local_batch if rows is None else rows
    if len(prompts) > b:
      raise ValueError(f"{len(prompts)} prompts for a rollout batch of {b}")
    ids = [self.tok.encode(text) for text in prompts]
    for i, (text, x) in enumerate(zip(prompts, ids)):
      if len(x) > self.prompt_len:
        raise ValueError(f"prompt {i} has {len(x)} tokens > prompt_len {self.prompt_len}: "
                         f"{text[:80]!r}...")
    longest = max(map(len, ids), default=1)
    if self.processes > 1 and not self.per_host:  # one program over every host's rows
      longest = parallel.max_over_hosts(longest)
    p = bucket_for(longest, self.buckets)
    tokens = np.full((b, p), self.tok.pad_id, np.int32)
    mask = np.zeros((b, p), bool)
    for i, x in enumerate(ids):
      tokens[i, p - len(x):] = x
      mask[i, p - len(x):] = True
    self.prefill_tokens["computed"] += (sum(bucket_for(len(x), self.buckets) for x in ids)
                                        if per_row else b * p)
    self.prefill_tokens["real"] += sum(map(len, ids))
    return tokens, mask

  def dispatch(self, params, prompts: Sequence[str], n_attempts: Sequence[int],
               key) -> ma.Episodes:
    """Starts one batch of this host's prompts (rows past them idle); returns at once."""
    rows = self.local_batch
    tokens, mask = self.encode_prompts(prompts)
    attempts = np.zeros(rows, np.int32)
    attempts[:len(prompts)] = n_attempts
    batch = (tokens, mask, attempts, np.arange(rows, dtype=np.int32))
    if self.per_host:
      params = self._host_params(params)
    else:
      params = self._sampling_params(params)
      layout = self.sampling_mesh or self.mesh
      if self.processes > 1 or self.sampling_mesh is not None:  # rows over 'data'
        batch = parallel.put_batch(batch, layout)
        key = np.asarray(key)  # replicated: every host passes the same key
    t0 = time.perf_counter()
    out = self._rollout_for(tokens.shape[1])(params, *batch, *self.feedback, key)
    if self.timeline is not None:
      self.timeline.track(out, t0)
    return out

  def run(self, params, prompts: Sequence[str], answers: Sequence[str],
          n_attempts: Sequence[int], key) -> ma.Episodes:
    """Runs one batch; rows past len(prompts) are idle padding.

    More prompts than rows run in runner-sized chunks of similar prompt lengths (so each
    chunk's prompt bucket follows its own longest prompt; chunk c with key fold_in(key, c))
    and come back as one batch of exactly len(prompts) rows, in the given order.
    Deferred (single-turn) runs come back as this host's rows in numpy, verdicts filled in.
    """
    if self.continuous:
      return self._run_queue(params, prompts, answers, n_attempts, key)
    if len(prompts) > self.local_batch:
      step = self.local_batch
      order = np.argsort([len(self.tok.encode(t)) for t in prompts], kind="stable")
      pick = lambda xs, lo: [xs[i] for i in order[lo:lo + step]]
      chunks = ma.concat_episodes([
          ma.first_rows(self.run(params, pick(prompts, lo), pick(answers, lo),
                                 pick(n_attempts, lo), jax.random.fold_in(key, c)),
                        min(step, len(prompts) - lo))
          for c, lo in enumerate(range(0, len(prompts), step))])
      return ma.take_rows(chunks, np.argsort(order))
    if self.deferred:
      episodes = self._local_rows(self.dispatch(params, prompts, n_attempts, key))
      return self._with_host_verdicts(episodes, answers)
    self.verify_fn.set_answers(list(answers) + [""] * (self.batch_size - len(prompts)))
    return self.dispatch(params, prompts, n_attempts, key)

  def _with_host_verdicts(self, episodes: ma.Episodes, answers: Sequence[str],
                          texts: Sequence[str] | None = None) -> ma.Episodes:
    """A deferred run completed by host verdicts; `texts`: its first rows' decoded responses."""
    live = np.asarray(episodes.attempted_turn)[0]
    if texts is None:
      tokens, action = np.asarray(episodes.tokens), np.asarray(episodes.action_mask)
      texts = [self.tok.decode(tokens[b][action[b]].tolist()) if live[b] else ""
               for b in range(len(live))]
    texts = list(texts) + [""] * (len(live) - len(texts))
    golds = list(answers) + [""] * (len(live) - len(answers))
    correct, boxed = self.verify_fn.verdicts(texts, golds, live)
    if self.spec.keep_stop_token:  # run-to-EOS rule (verl, LTE): a truncated response is wrong
      correct = np.asarray(correct, bool) & ~np.asarray(episodes.truncated, bool)
    return ma.with_verdicts(episodes, correct, boxed)

  def to_host(self, episodes: ma.Episodes, n: int) -> HostEpisodes:
    """Responses, answers and outcomes of the first n rows, as numpy / Python objects."""
    from mar import verify  # host-only dependency

    tokens = np.asarray(episodes.tokens)
    action = np.asarray(episodes.action_mask)
    attempt = np.asarray(episodes.attempt_id)
    logp = np.asarray(episodes.logprobs, np.float32)
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
        logprobs=[logp[b][action[b]] for b in range(n)],
    )

  def run_host(self, params, prompts: Sequence[str], answers: Sequence[str], key,
               n_attempts: Sequence[int] | None = None, _sorted: bool = False) -> HostEpisodes:
    """Any number of this host's prompts, in batch-sized chunks; the concatenated host view.

    Prompts are chunked in order of length (results come back in the given order), so
    each chunk's prompt bucket follows its own longest prompt.

    Deferred runs dispatch chunk c + 1 before verifying chunk c, so the host's decoding and
    verification overlap the device's sampling.
    """
    n_attempts = [1] * len(prompts) if n_attempts is None else list(n_attempts)
    if self.continuous:
      return self._run_queue(params, prompts, answers, n_attempts, key, host=True)
    step = self.local_batch
    if len(prompts) > step and not _sorted:  # chunks of similar lengths, so each gets a small prompt bucket
      order = np.argsort([len(self.tok.encode(t)) for t in prompts], kind="stable")
      out = self.run_host(params, [prompts[i] for i in order], [answers[i] for i in order],
                          key, [n_attempts[i] for i in order], _sorted=True)
      back = np.argsort(order)
      return select_rows(out, back)
    chunks = [(lo, min(lo + step, len(prompts))) for lo in range(0, len(prompts), step)]
    parts, pending = [], None
    for c, (lo, hi) in enumerate(chunks):
      ckey = jax.random.fold_in(key, c)
      if not self.deferred:
        parts.append(self.to_host(self.run(params, prompts[lo:hi], answers[lo:hi],
                                           n_attempts[lo:hi], ckey), hi - lo))
        continue
      started = self.dispatch(params, prompts[lo:hi], n_attempts[lo:hi], ckey)
      if pending is not None:
        parts.append(self._finish(*pending))
      pending = (started, answers[lo:hi])
    if pending is not None:
      parts.append(self._finish(*pending))
    return HostEpisodes(
        responses=[r for p in parts for r in p.responses],
        texts=[t for p in parts for t in p.texts],
        answers=[a for p in parts for a in p.answers],
        correct=np.concatenate([p.correct for p in parts]),
        truncated=np.concatenate([p.truncated for p in parts]),
        reward=np.concatenate([p.reward for p in parts]),
        logprobs=[x for p in parts for x in p.logprobs],
    )

  def sampling_copy(self, params):
    """The sampling copy of `params` (made now if not yet made for them)."""
    return self._sampling_params(params)

  def serve_sampling_copy(self, params) -> None:
    """Later runs given `params` sample from the copy made last: the same policy, moved
    (train.offload_state parks it in host memory during the rollout)."""
    self._sampling_params_cache = (params, self._sampling_params_cache[1])

  def _sampling_params(self, params):
    """The policy in the sampling layout and dtype: one timed reshard per distinct params."""
    if self.sampling_mesh is None:
      return params
    cached_for, out = self._sampling_params_cache
    if cached_for is params:
      return out
    shardings = parallel.sampling_shardings(self.model_config, self.sampling_mesh)
    out, self.reshard_stats = parallel.reshard(params, shardings, dtype=self.sampling_dtype)
    out = _unstack(out)  # the decode layout, so the rollout program copies no weights
    self._sampling_params_cache = (params, out)
    return out

  def _local_mesh(self):
    """This host's devices, laid out as the sampling (else the training) mesh asks."""
    devices = jax.local_devices()
    mesh_shape = (self.sampling_mesh or self.mesh).shape
    tensor = mesh_shape["tensor"] if len(devices) % mesh_shape["tensor"] == 0 else 1
    if self.sampling_mesh is not None:
      return sharding_lib.make_mesh(-1, 1, tensor, devices=devices)
    return sharding_lib.make_mesh(1, -1, tensor, devices=devices)

  # ----- the continuous engine ---------------------------------------------------------------

  def _run_queue(self, params, prompts, answers, n_attempts, key, host: bool = False):
    """All of this host's prompts as one queue of the continuous engine.

    Returns Episodes of exactly len(prompts) rows (deferred: numpy, verdicts filled in), or
    with `host` their HostEpisodes.
    """
    n, rows = len(prompts), self.local_batch
    q = queue_len(n, rows)
    tokens, mask = self.encode_prompts(prompts, rows=q, per_row=True)  # one bucket for the queue
    attempts = np.zeros(q, np.int32)
    attempts[:n] = n_attempts
    batch = (tokens, mask, attempts)
    if not self.deferred:
      self.verify_fn.set_answers(list(answers) + [""] * (q - n))
    if self.per_host:
      params = self._host_params(params)
    else:
      params = self._sampling_params(params)
      if self.processes > 1:  # this host's queue -> the global queue
        batch = parallel.put_batch(batch, self.mesh)
        key = np.asarray(key)
    t0 = time.perf_counter()
    episodes, stats = self._engine_for(tokens.shape[1])(params, *batch, *self.feedback, key)
    if self.timeline is not None:
      self.timeline.track(episodes, t0)
    self._stats.append(stats)
    if not self.deferred:
      episodes = ma.first_rows(episodes, n)
      return self.to_host(episodes, n) if host else episodes
    local = self._local_rows(episodes, q * self.processes)
    if host:
      return self._finish(local, answers, local_already=True)
    return ma.first_rows(self._with_host_verdicts(local, answers), n)

  def _engine_for(self, bucket: int, groups: tuple = ()):
    """The continuous engine's program for one prompt bucket (one compile each); `groups`:
    (group_size, groups_needed, keep_none_pass) of a dynamic-sampling queue."""
    if (bucket, groups) not in self._continuous:
      espec = continuous.EngineSpec(self.spec_for(bucket), rows=self._engine_rows,
                                    prompt_widths=tuple(w for w in self.buckets if w < bucket),
                                    **self._engine_args)
      if groups:
        espec = dataclasses.replace(espec, group_size=groups[0], groups_needed=groups[1],
                                    keep_none_pass=groups[2])
      deferred = self.deferred and not groups  # groups are verified in the program
      pred, vfn, choose = self.stop_predicate, None if deferred else self.verify_fn, \
          self._choose_fn
      # One engine per data shard of the sampling layout (rows and queue split over 'data').
      mesh = self._local_mesh() if self.per_host else self.sampling_mesh
      self._continuous[bucket, groups] = jax.jit(lambda params, *args: continuous.rollout(
          self.model_config, params, espec, pred, vfn, *args, choose_fn=choose, mesh=mesh))
    return self._continuous[bucket, groups]

  def run_groups(self, params, prompts: Sequence[str], answers: Sequence[str], key, *,
                 group_size: int, needed: int, keep_none_pass: bool = False):
    """Dynamic sampling (DAPO): groups of `group_size` consecutive prompts as one queue that
    closes once `needed` groups are informative (`rollout.schedule`, groups).

    Verdicts come from the program's own checks (the run-to-EOS rule applied there), so the
    host view's `correct` is what decided the groups. Returns (HostEpisodes of every queued
    episode, verified [n] bool: its verdict was given, admitted [n] bool: it entered a row).
    One process only (the decision needs the whole queue in one program).
    """
    if not self.continuous or self.processes > 1 or self.spec.max_attempts != 1:
      raise ValueError("grpo.dynamic_sampling needs rollout.engine=continuous, one process "
                       "and single-turn groups")
    n, rows = len(prompts), self.local_batch
    q = queue_len(n, rows)
    tokens, mask = self.encode_prompts(prompts, rows=q, per_row=True)
    attempts = np.zeros(q, np.int32)
    attempts[:n] = 1
    self.verify_fn.set_answers(list(answers) + [""] * (q - n))
    engine = self._engine_for(tokens.shape[1], (group_size, needed, keep_none_pass))
    t0 = time.perf_counter()
    episodes, stats = engine(self._sampling_params(params), tokens, mask, attempts,
                             *self.feedback, key)
    if self.timeline is not None:
      self.timeline.track(episodes, t0)
    self._stats.append(stats)
    episodes = ma.first_rows(jax.device_get(episodes), n)
    return (self.to_host(episodes, n), np.asarray(episodes.attempted_turn)[0],
            np.asarray(episodes.valid).any(1))

  def take_stats(self) -> dict:
    """rollout/* metrics of the continuous programs run since the last call ({} if none)."""
    stats, self._stats = jax.device_get(self._stats), []
    if not stats:
      return {}
    total = {k: sum(int(s[k]) for s in stats) for k in stats[0]}
    rows = self._engine_rows
    return {
        "rollout/decode_steps": float(total["decode_steps"]),
        "rollout/prefill_rows": float(total["prefill_rows"]),
        "rollout/slot_utilization": total["sampled"] / max(rows * total["decode_steps"], 1),
        "rollout/verify_checks": float(total["checks"]),
    }

  def _host_params(self, params):
    """The policy gathered onto this host's devices, in the sampling layout and dtype.

    A collective (every host calls dispatch in step), once per distinct `params`.
    """
    cached_for, local = self._host_params_cache
    if cached_for is params:
      return local
    if self.sampling_mesh is not None:
      shardings = parallel.sampling_shardings(self.model_config, self._local_mesh())
    else:
      shardings = sharding_lib.param_shardings(self.model_config, self._local_mesh())
    start = time.perf_counter()
    gathered = multihost_utils.process_allgather(params, tiled=True)
    local, stats = parallel.reshard(gathered, shardings, dtype=self.sampling_dtype)
    local = _unstack(local)
    self.reshard_stats = dict(stats, seconds=time.perf_counter() - start)
    self._host_params_cache = (params, local)
    return local

  def _finish(self, episodes: ma.Episodes, answers: Sequence[str],
              local_already: bool = False) -> HostEpisodes:
    """Host view of a deferred chunk: this host's rows, verified here."""
    n = len(answers)
    local = episodes if local_already else self._local_rows(episodes)
    host = self.to_host(local, n)
    done = self._with_host_verdicts(local, answers, host.texts)  # texts decoded once
    return dataclasses.replace(host, correct=done.correct_turn[0, :n],
                               truncated=done.truncated[:n], reward=done.reward[:n])

  def _local_rows(self, episodes: ma.Episodes, total: int | None = None) -> ma.Episodes:
    """This host's rows of a rollout (or queue) of `total` rows (default: the batch), in numpy."""
    if self.processes == 1:
      return jax.device_get(episodes)
    # Whatever layout XLA chose for the outputs, gather them and keep this host's rows.
    full = multihost_utils.process_allgather(episodes, tiled=True)
    rows = parallel.local_rows(self.batch_size if total is None else total)
    return ma.Episodes(**{
        f: np.asarray(v)[:, rows] if f in ma.TURN_FIELDS else np.asarray(v)[rows]
        for f, v in full._asdict().items()})
