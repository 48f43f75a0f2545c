"""Host driver of the rollout engine: texts in, episodes (and host-side results) out.

Tokenizes the prompt texts into one queue (left-padded to the smallest of a few bucket
widths, powers of two up to prompt_len, that holds the longest; each prompt is prefilled at
its own bucket inside the program), runs the continuous engine (`continuous.py`) over it,
and hands back device episodes plus the per-row responses the group family and evaluation
need on the host.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from mar import episodes as episodes_lib
from mar import parallel
from mar.data.tokenizer import Tokenizer, feedback_table
from mar.models import model as qwen
from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig
from mar.rollout import continuous
from mar.rollout import spec as spec_lib
from mar.rollout.host import AttemptVerifier
from mar.sampling import SamplingParams, boxed_stop_predicate


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


@dataclasses.dataclass(frozen=True)
class RunnerSpec:
  """What a runner's programs are built for (one compile per prompt bucket)."""

  batch_size: int  # rows decoding together, over all hosts
  prompt_len: int  # the largest prompt bucket
  max_attempts: int  # M
  token_budget: int  # generated tokens an episode's attempts share
  sampling: SamplingParams
  check_every: int = 1  # tokens between stop-predicate checks
  hint_feedback_len: int = 0  # > 0: hybrid feedback turns that list the wrong answers so far
  stop_at_box: bool = True  # an attempt ends at its first closed \boxed{} (else: run to EOS)
  refill_rows: int = 0  # rows one in-program refill prefills (0: batch_size // 16, >= 1)
  refill_wait: int = 16  # decode steps a freed row may wait for others before a refill
  verify_every: int = 8  # decode steps between verification checks

  @property
  def single_turn(self) -> bool:
    return self.max_attempts == 1 and not self.hint_feedback_len


class RolloutRunner:
  """Owns the compiled engine programs for a `RunnerSpec`: one per prompt bucket.

  Each call queues all its prompts (`_run_queue`) at the smallest bucket (`prompt_buckets`:
  powers of two from 64, then prompt_len) that holds the longest, and the dialogue slots
  shrink with it, so short prompts are not sampled at the longest one's cost.

  Single-turn rollouts (M = 1, no hybrid hints) are verified on the host after the program
  instead of in a callback inside it (`deferred`). On several hosts (`jax.distributed`)
  each host passes its own prompts (`batch_size / process_count` rows). Deferred rollouts
  run as one program on the global queue, and each host reads back and verifies only its
  rows. Multi-attempt rollouts run per host (`per_host`): each host gathers the policy onto
  its own devices and runs its rows there, verifying in the callback as on one host.
  """

  def __init__(self, model_config: QwenConfig, tokenizer: Tokenizer, verifier,
               spec: RunnerSpec, *, mesh=None, sampling_mesh=None, sampling_dtype=None,
               timeline=None, defer_verify: bool | None = None, feedback_text=None,
               choose_fn=None):
    """`mesh`: the training layout; `sampling_mesh` / `sampling_dtype`: the rollout's own
    (rows over its 'data', weights in that dtype over its 'tensor'); `timeline`: an
    `overlap.DeviceTimeline` to register programs with; `defer_verify`: verify single-turn
    queues on the host after the program (default: whenever single-turn); `feedback_text`:
    writes hybrid feedback turns; `choose_fn`: a scripted token chooser (tests)."""
    self.tok, self.model_config = tokenizer, model_config
    self.batch_size, self.prompt_len = spec.batch_size, spec.prompt_len
    self.processes = jax.process_count()
    if spec.batch_size % self.processes:
      raise ValueError(f"rollout batch_size {spec.batch_size} does not split over "
                       f"{self.processes} hosts")
    self.local_batch = spec.batch_size // self.processes
    self.deferred = spec.single_turn if defer_verify is None else defer_verify
    if self.deferred and not spec.single_turn:
      raise ValueError("defer_verify needs a single-turn rollout (max_attempts=1, no hints)")
    # Multi-attempt rollouts on several hosts: the per-turn callback needs the whole batch
    # of its program on one host, so each host runs its own rows on its own devices.
    self.per_host = self.processes > 1 and not self.deferred
    fb_tokens, fb_lengths = feedback_table(tokenizer, spec.max_attempts)
    self.feedback = (np.asarray(fb_tokens), np.asarray(fb_lengths))
    self._feedback_len = max(fb_tokens.shape[1], spec.hint_feedback_len)
    self.buckets = prompt_buckets(spec.prompt_len)
    self.spec = self._rollout_spec(spec)
    self.verify_fn = AttemptVerifier(tokenizer, verifier, feedback_text=feedback_text)
    strings = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    # An attempt ends at its first closed \boxed{} only under multi-attempt's rule.
    self.stop_predicate = boxed_stop_predicate(strings) if spec.stop_at_box else None
    self.mesh, self.timeline = mesh, timeline
    # The sampling layout, made from the training layout once per distinct params
    # (`reshard_stats`).
    self.sampling_mesh, self.sampling_dtype = sampling_mesh, sampling_dtype
    self._sampling_params_cache: tuple = (None, None)
    self._host_params_cache: tuple = (None, None)
    self.reshard_stats: dict = {}
    # Prompt tokens computed by prefill vs real ones, since the runner was built.
    self.prefill_tokens = {"computed": 0, "real": 0}
    # The engine runs any number of prompts as one queue (padded to a multiple of
    # the rows, so it compiles for a few queue lengths and one program per prompt bucket);
    # one program over the global rows when deferred on several hosts, else this host's rows.
    self._engine_rows = (self.local_batch if (self.per_host or self.processes == 1)
                         else spec.batch_size)
    self._engine_args = dict(refill_rows=spec.refill_rows, refill_wait=spec.refill_wait,
                             verify_every=spec.verify_every)
    self._choose_fn = choose_fn
    self._continuous: dict[tuple, object] = {}  # (prompt bucket, groups) -> its engine
    self._stats: list = []  # the engine's counters of each program since take_stats

  def _rollout_spec(self, spec: RunnerSpec) -> spec_lib.RolloutSpec:
    """The engine's spec at the largest prompt bucket."""
    return spec_lib.RolloutSpec(
        max_attempts=spec.max_attempts,
        token_budget=spec.token_budget,
        cache_len=spec_lib.cache_len_for(spec.prompt_len, spec.token_budget,
                                         spec.max_attempts, self._feedback_len),
        sampling=spec.sampling,
        stop_ids=(self.tok.im_end_id, self.tok.eos_id),
        check_every=spec.check_every,
        hint_feedback_len=spec.hint_feedback_len,
        # Run to EOS (verl, LTE): the single-turn response keeps its EOS as a trained action.
        keep_stop_token=spec.single_turn and not spec.stop_at_box,
    )

  def spec_for(self, bucket: int) -> spec_lib.RolloutSpec:
    """The rollout spec of one prompt bucket: its cache holds that bucket, not the largest."""
    return dataclasses.replace(self.spec, cache_len=spec_lib.cache_len_for(
        bucket, self.spec.token_budget, self.spec.max_attempts, self._feedback_len))

  def fits(self, prompt: str) -> bool:
    """Whether a prompt text fits the largest prompt bucket."""
    return len(self.tok.encode(prompt)) <= self.prompt_len

  def encode_prompts(self, prompts: Sequence[str], rows: int | None = None):
    """Left-pads this host's tokenized prompts into [rows, P] (+ mask); rows = B / hosts.

    P is the smallest bucket that holds the longest prompt (on several hosts running one
    program, the longest of all hosts'). Raises if a prompt is longer than prompt_len.
    The program prefills each prompt at its own bucket, which is what `prefill_tokens`
    counts.
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
    self.prefill_tokens["computed"] += sum(bucket_for(len(x), self.buckets) for x in ids)
    self.prefill_tokens["real"] += sum(map(len, ids))
    return tokens, mask

  def run(self, params, prompts: Sequence[str], answers: Sequence[str],
          n_attempts: Sequence[int], key) -> episodes_lib.Episodes:
    """Episodes of exactly len(prompts) rows, in the given order (one queue of the engine).

    Deferred (single-turn) runs come back as this host's rows in numpy, verdicts filled in.
    """
    return self._run_queue(params, prompts, answers, n_attempts, key)

  def _with_host_verdicts(self, episodes: episodes_lib.Episodes, answers: Sequence[str],
                          texts: Sequence[str] | None = None) -> episodes_lib.Episodes:
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
    return episodes_lib.with_verdicts(episodes, correct, boxed)

  def to_host(self, episodes: episodes_lib.Episodes, n: int) -> HostEpisodes:
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
               n_attempts: Sequence[int] | None = None) -> HostEpisodes:
    """Any number of this host's prompts as one queue; their host view, in the given order."""
    n_attempts = [1] * len(prompts) if n_attempts is None else list(n_attempts)
    return self._run_queue(params, prompts, answers, n_attempts, key, host=True)

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

  def _run_queue(self, params, prompts, answers, n_attempts, key, host: bool = False):
    """All of this host's prompts as one queue of the engine.

    Returns Episodes of exactly len(prompts) rows (deferred: numpy, verdicts filled in), or
    with `host` their HostEpisodes.
    """
    n, rows = len(prompts), self.local_batch
    q = queue_len(n, rows)
    tokens, mask = self.encode_prompts(prompts, rows=q)  # one bucket for the queue
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
      episodes = episodes_lib.first_rows(episodes, n)
      return self.to_host(episodes, n) if host else episodes
    local = self._local_rows(episodes, q * self.processes)
    if host:
      return self._finish(local, answers)
    return episodes_lib.first_rows(self._with_host_verdicts(local, answers), n)

  def _engine_for(self, bucket: int, groups: tuple = ()):
    """The engine's program for one prompt bucket (one compile each); `groups`:
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
    if self.processes > 1 or self.spec.max_attempts != 1:
      raise ValueError("grpo.dynamic_sampling needs one process and single-turn groups")
    n, rows = len(prompts), self.local_batch
    q = queue_len(n, rows)
    tokens, mask = self.encode_prompts(prompts, rows=q)
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
    episodes = episodes_lib.first_rows(jax.device_get(episodes), n)
    return (self.to_host(episodes, n), np.asarray(episodes.attempted_turn)[0],
            np.asarray(episodes.valid).any(1))

  def take_stats(self) -> dict:
    """rollout/* metrics of the engine programs run since the last call ({} if none)."""
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

    A collective (every host runs its queue in step), once per distinct `params`.
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

  def _finish(self, local: episodes_lib.Episodes, answers: Sequence[str]) -> HostEpisodes:
    """Host view of a deferred queue's rows on this host (numpy), verified here."""
    n = len(answers)
    host = self.to_host(local, n)
    done = self._with_host_verdicts(local, answers, host.texts)  # texts decoded once
    return dataclasses.replace(host, correct=done.correct_turn[0, :n],
                               truncated=done.truncated[:n], reward=done.reward[:n])

  def _local_rows(self, episodes: episodes_lib.Episodes, total: int) -> episodes_lib.Episodes:
    """This host's rows of a queue of `total` rows, in numpy."""
    if self.processes == 1:
      return jax.device_get(episodes)
    # Whatever layout XLA chose for the outputs, gather them and keep this host's rows.
    full = multihost_utils.process_allgather(episodes, tiled=True)
    rows = parallel.local_rows(total)
    return episodes_lib.Episodes(**{
        f: np.asarray(v)[:, rows] if f in episodes_lib.TURN_FIELDS else np.asarray(v)[rows]
        for f, v in full._asdict().items()})
