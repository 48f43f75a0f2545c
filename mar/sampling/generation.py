"""`generate`: token lists in, generated token lists out (host convenience over the sampler).

Prompts are left-padded to a length bucket (powers of two from 16) and the cache length
rounded up, so a handful of shapes cover all calls and each compiles once. With a mesh,
rows are split over ('data', 'fsdp') and params and KV heads follow
`mar.models.sharding`'s rules; without one, the same code runs on the default device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mar.models import model as qwen
from mar.models.config import QwenConfig
from mar.sampling import sampler
from mar.sampling.sample import SamplingParams
from mar.sampling.stop import StopPredicate

PROMPT_BUCKETS = tuple(1 << i for i in range(4, 18))  # 16 .. 131072
CACHE_ROUND = 32
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class GenerateResult:
  """Per prompt: generated ids (stop token included when hit), their log-probs, why it ended."""

  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  finish_reason: list[str]  # 'stop' | 'length' | 'predicate'
  finish: np.ndarray  # [N] int32 FINISH_* codes


def prompt_bucket(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  """Smallest bucket >= length."""
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(f"prompt of {length} tokens is longer than the largest bucket {buckets[-1]}")


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, rows: int, pad_id: int = 0):
  """Left-pads token lists into (tokens [rows, length] int32, mask [rows, length] bool)."""
  tokens = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, length - len(p):] = p
      mask[i, length - len(p):] = True
  return tokens, mask


def _check_prompts(prompts, vocab_size: int):
  if not prompts:
    raise ValueError("generate: prompts is empty")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"generate: prompts[{i}] is empty; expected at least one token")
    bad = [t for t in p if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f"generate: prompts[{i}] has ids {bad[:5]} outside [0, {vocab_size})")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_for_mesh(config: QwenConfig, params, mesh: Mesh):
  """Places stacked or unstacked params on `mesh` by `mar.models.sharding` rules."""
  from mar.models import sharding  # pylint: disable=g-import-not-at-top

  if not qwen.is_unstacked(params["layers"]):
    return sharding.shard_params(params, config, mesh)
  one = config.replace(num_layers=1)
  stacked = qwen.stack_layers({**params, "layers": params["layers"][:1]})
  placed = sharding.shard_params(stacked, one, mesh)
  layer_sh = jax.tree.map(lambda a: NamedSharding(mesh, PartitionSpec(*a.sharding.spec[1:])),
                          placed["layers"])
  layers = tuple(jax.device_put(lp, layer_sh) for lp in params["layers"])
  return {**{k: v for k, v in placed.items() if k != "layers"}, "layers": layers}


def generate(
    config: QwenConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    mesh: Mesh | None = None,
    *,
    stop_predicate: StopPredicate | None = None,
    check_every: int = 1,
    pad_id: int = 0,
) -> GenerateResult:
  """Samples up to `max_new_tokens` for each prompt (a list of token ids)."""
  _check_prompts(prompts, config.vocab_size)
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, found {max_new_tokens}")
  sampling = SamplingParams(temperature, top_p, top_k)
  n = len(prompts)
  p = prompt_bucket(max(len(x) for x in prompts))
  cache_len = p + CACHE_ROUND * math.ceil(max_new_tokens / CACHE_ROUND)
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
  rows = shards * math.ceil(n / shards)
  tokens, mask = pad_prompts(prompts, p, rows, pad_id)
  max_new = np.where(np.arange(rows) < n, max_new_tokens, 0).astype(np.int32)
  if sampler._default_unroll():  # pylint: disable=protected-access
    params = qwen.unstack_layers(params)
  if mesh is not None:
    params = shard_for_mesh(config, params, mesh)
    tokens, mask, max_new = (jax.device_put(x, batch_sharding(mesh, x.ndim))
                             for x in (tokens, mask, max_new))
  state = sampler.prefill(config, params, tokens, mask, cache_len,
                          key=jax.random.key(seed))
  state = sampler.decode(config, params, state, max_new=max_new, sampling=sampling,
                         stop_ids=tuple(stop_ids), stop_predicate=stop_predicate,
                         check_every=check_every)
  out_tokens, out_lp, num_new, finish = jax.device_get(
      (state.tokens, state.logprobs, state.num_new, state.finish))
  return GenerateResult(
      tokens=[out_tokens[i, p:p + num_new[i]].tolist() for i in range(n)],
      logprobs=[out_lp[i, p:p + num_new[i]] for i in range(n)],
      finish_reason=[sampler.FINISH_NAMES[int(f)] for f in finish[:n]],
      finish=finish[:n],
  )
