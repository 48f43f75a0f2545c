"""Import and export of HF `transformers` Qwen2 / Qwen3 safetensors checkpoints.

The whole mapping is the `RULES` table below: a regex over HF tensor names, the leaf of our
params pytree it lands in, where in that leaf's per-layer block it goes, the HF shape, and
whether the HF `[out, in]` matrix is transposed. The HF tensor (transposed if flagged) is
reshaped to the shape of its slot, which is exact because HF orders query heads by KV group
(head h serves KV head h // R), as does our [K, R] layout.

Loading streams: one HF tensor is read at a time (safetensors memory-maps the file) and
written into a preallocated host buffer for its leaf; each leaf is placed on device (on its
mesh sharding when a mesh is given) as soon as it is complete, so host memory holds one leaf
plus one tensor, never two copies of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read it)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mar.models import sharding as sharding_lib
from mar.models.config import QwenConfig
from mar.models.init import param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' default


@dataclasses.dataclass(frozen=True)
class _Dims:
  V: int
  D: int
  F: int
  K: int
  R: int
  H: int
  Dh: int


def _dims(c: QwenConfig) -> _Dims:
  return _Dims(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_kv_heads,
               c.group_size, c.num_heads, c.head_dim)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor family. `slot(d)` indexes the leaf's block (after the layer index)."""

  hf: str  # regex over the HF name; group 1 is the layer index for per-layer tensors
  leaf: str  # "embed", "layers/qkv", ...
  slot: Callable[[_Dims], Any]
  hf_shape: Callable[[_Dims], tuple[int, ...]]
  transpose: bool  # HF stores Linear weights as [out, in]; we store [in, out]
  needs: str = ""  # config property the tensor exists under ("qkv_bias", "qk_norm", "untied")

  @property
  def per_layer(self) -> bool:
    return self.leaf.startswith("layers/")

  def name(self, layer: int | None) -> str:
    """The HF name for `layer` (regex -> literal)."""
    literal = self.hf.replace(r"(\d+)", str(layer)) if self.per_layer else self.hf
    return literal.replace("\\", "")


_ALL = np.s_[...]
_LAYER = r"model\.layers\.(\d+)\."

# fmt: off
# HF name (regex; group 1 = layer)                     our leaf            slot in leaf[layer]             HF shape                     transpose, needs
RULES = (
    Rule(r"model\.embed_tokens\.weight",               "embed",            lambda d: _ALL,                 lambda d: (d.V, d.D),        False),
    Rule(r"model\.norm\.weight",                       "final_norm",       lambda d: _ALL,                 lambda d: (d.D,),            False),
    Rule(r"lm_head\.weight",                           "lm_head",          lambda d: _ALL,                 lambda d: (d.V, d.D),        True, "untied"),
    Rule(_LAYER + r"input_layernorm\.weight",          "layers/attn_norm", lambda d: _ALL,                 lambda d: (d.D,),            False),
    Rule(_LAYER + r"self_attn\.q_proj\.weight",        "layers/qkv",       lambda d: np.s_[:, :, : d.R],   lambda d: (d.H * d.Dh, d.D), True),
    Rule(_LAYER + r"self_attn\.k_proj\.weight",        "layers/qkv",       lambda d: np.s_[:, :, d.R],     lambda d: (d.K * d.Dh, d.D), True),
    Rule(_LAYER + r"self_attn\.v_proj\.weight",        "layers/qkv",       lambda d: np.s_[:, :, d.R + 1], lambda d: (d.K * d.Dh, d.D), True),
    Rule(_LAYER + r"self_attn\.q_proj\.bias",          "layers/qkv_bias",  lambda d: np.s_[:, : d.R],      lambda d: (d.H * d.Dh,),     False, "qkv_bias"),
    Rule(_LAYER + r"self_attn\.k_proj\.bias",          "layers/qkv_bias",  lambda d: np.s_[:, d.R],        lambda d: (d.K * d.Dh,),     False, "qkv_bias"),
    Rule(_LAYER + r"self_attn\.v_proj\.bias",          "layers/qkv_bias",  lambda d: np.s_[:, d.R + 1],    lambda d: (d.K * d.Dh,),     False, "qkv_bias"),
    Rule(_LAYER + r"self_attn\.q_norm\.weight",        "layers/q_norm",    lambda d: _ALL,                 lambda d: (d.Dh,),           False, "qk_norm"),
    Rule(_LAYER + r"self_attn\.k_norm\.weight",        "layers/k_norm",    lambda d: _ALL,                 lambda d: (d.Dh,),           False, "qk_norm"),
    Rule(_LAYER + r"self_attn\.o_proj\.weight",        "layers/o",         lambda d: _ALL,                 lambda d: (d.D, d.H * d.Dh), True),
    Rule(_LAYER + r"post_attention_layernorm\.weight", "layers/mlp_norm",  lambda d: _ALL,                 lambda d: (d.D,),            False),
    Rule(_LAYER + r"mlp\.gate_proj\.weight",           "layers/gate_up",   lambda d: np.s_[:, 0],          lambda d: (d.F, d.D),        True),
    Rule(_LAYER + r"mlp\.up_proj\.weight",             "layers/gate_up",   lambda d: np.s_[:, 1],          lambda d: (d.F, d.D),        True),
    Rule(_LAYER + r"mlp\.down_proj\.weight",           "layers/down",      lambda d: _ALL,                 lambda d: (d.D, d.F),        True),
)
# fmt: on

# Buffers some exporters write that are not parameters (recomputed from the config).
_IGNORED = (re.compile(_LAYER + r"self_attn\.rotary_emb\.inv_freq"),)


def _rules_for(config: QwenConfig) -> list[Rule]:
  have = {"": True, "qkv_bias": config.qkv_bias, "qk_norm": config.qk_norm,
          "untied": not config.tie_word_embeddings}
  return [r for r in RULES if have[r.needs]]


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One expected HF tensor: its name, rule and layer."""

  name: str
  rule: Rule
  layer: int | None


def _expected(config: QwenConfig) -> list[_Entry]:
  """Every HF tensor of `config`, in leaf order, then layer, then rule order."""
  rules = _rules_for(config)
  out = []
  for leaf in _leaf_paths(config):
    for layer in range(config.num_layers) if leaf.startswith("layers/") else [None]:
      out += [_Entry(r.name(layer), r, layer) for r in rules if r.leaf == leaf]
  return out


def _leaf_paths(config: QwenConfig) -> list[str]:
  shapes = param_shapes(config)
  return [k for k in shapes if k != "layers"] + [f"layers/{k}" for k in shapes["layers"]]


def _get(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _set(tree: dict, path: str, value) -> None:
  *parents, last = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[last] = value


def _block(buf: np.ndarray, entry: _Entry, d: _Dims) -> np.ndarray:
  """The view of a leaf buffer that `entry` fills."""
  view = buf if entry.layer is None else buf[entry.layer]
  return view[entry.rule.slot(d)]


# ----- reading ---------------------------------------------------------------------------


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from the index or the single file."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: model folder does not exist")
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
    files = {}
    for name, fname in weight_map.items():
      fpath = os.path.join(path, fname)
      if not os.path.isfile(fpath):
        raise FileNotFoundError(f"{index}: tensor {name!r} is in {fname!r}, which is missing")
      files[name] = fpath
    return files
  if os.path.isfile(single):
    with _open(single) as f:
      return {name: single for name in f.keys()}
  found = sorted(os.listdir(path))
  raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:20]})")


def _open(fpath: str):
  try:
    return safe_open(fpath, framework="numpy")
  except Exception as e:  # safetensors raises its own error types; name the file
    raise ValueError(f"{fpath}: not a readable safetensors file ({e})") from e


def _match(name: str, config: QwenConfig, rules: list[Rule], where: str) -> _Entry | None:
  for rule in RULES:
    m = re.fullmatch(rule.hf, name)
    if not m:
      continue
    if rule not in rules:
      if rule.leaf == "lm_head":  # tied models ignore it, as transformers does
        logging.warning("%s: ignoring %s (tie_word_embeddings=True)", where, name)
        return None
      raise ValueError(
          f"{where}: unexpected tensor {name!r} for a {config.model_type} config "
          f"(this architecture has no {rule.leaf.split('/')[-1]!r})"
      )
    layer = int(m.group(1)) if rule.per_layer else None
    if layer is not None and layer >= config.num_layers:
      raise ValueError(
          f"{where}: tensor {name!r} is for layer {layer} but config.json has "
          f"num_hidden_layers={config.num_layers}"
      )
    return _Entry(name, rule, layer)
  if any(p.fullmatch(name) for p in _IGNORED):
    return None
  raise ValueError(f"{where}: unexpected tensor {name!r} (no rule maps it to a parameter)")


def _check_tensors(files: dict[str, str], config: QwenConfig, handles) -> None:
  """Fails before reading anything on a missing/extra tensor or a wrong shape."""
  rules, d = _rules_for(config), _dims(config)
  keys = {f: set(h.keys()) for f, h in handles.items()}
  found = {}
  for name, fpath in files.items():
    entry = _match(name, config, rules, fpath)
    if entry is not None:
      found[name] = entry
  for entry in _expected(config):
    if entry.name not in found:
      where = sorted(set(files.values())) or "(no files)"
      raise ValueError(
          f"missing tensor {entry.name!r}, expected shape {entry.rule.hf_shape(d)}; "
          f"not in {where}"
      )
    fpath = files[entry.name]
    if entry.name not in keys[fpath]:
      raise ValueError(f"{fpath}: missing tensor {entry.name!r} (the index lists it here)")
    got = tuple(handles[fpath].get_slice(entry.name).get_shape())
    want = entry.rule.hf_shape(d)
    if got != want:
      raise ValueError(
          f"{fpath}: tensor {entry.name!r} has shape {got}, expected {want} "
          f"from config.json"
      )


def load_hf(
    path: str,
    dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
) -> tuple[QwenConfig, dict]:
  """Loads an HF Qwen2/Qwen3 folder -> (config with `dtype` as compute dtype, params).

  Params are stored in `dtype`. With a mesh, each leaf is placed with its sharding from
  `rules`; otherwise on the default device.
  """
  files = _weight_files(path)
  config = QwenConfig.from_hf_dir(path).replace(dtype=dtype)
  shapes = param_shapes(config)
  d = _dims(config)
  shardings = None if mesh is None else sharding_lib.param_shardings(config, mesh, rules)
  np_dtype = np.dtype(dtype)
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
    _check_tensors(files, config, handles)
    expected = _expected(config)
    for leaf in _leaf_paths(config):
      buf = np.empty(_get(shapes, leaf), np_dtype)
      for entry in (e for e in expected if e.rule.leaf == leaf):
        x = handles[files[entry.name]].get_tensor(entry.name)
        if entry.rule.transpose:
          x = x.T
        block = _block(buf, entry, d)
        block[...] = x.reshape(block.shape)
        del x
      _set(params, leaf, _place(buf, None if shardings is None else _get(shardings, leaf)))
      del buf
  return config, params


def _place(buf: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(buf)
  # Each device (on every host) gets only its shard, read from this host's buffer.
  return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])


# ----- writing ---------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _hf_tensor(leaf: np.ndarray, entry: _Entry, d: _Dims) -> np.ndarray:
  """The inverse of load: slot view -> HF-shaped contiguous tensor."""
  block = _block(leaf, entry, d)
  shape = entry.rule.hf_shape(d)
  if entry.rule.transpose:
    return np.ascontiguousarray(block.reshape(shape[::-1]).T)
  return np.ascontiguousarray(block.reshape(shape))


def _plan_shards(entries: list[_Entry], d: _Dims, itemsize: int, max_bytes: int) -> list[int]:
  """Shard index of each entry: greedy in order, a new shard when the next would overflow."""
  shard, used, out = 0, 0, []
  for e in entries:
    size = math.prod(e.rule.hf_shape(d)) * itemsize
    if used and used + size > max_bytes:
      shard, used = shard + 1, 0
    used += size
    out.append(shard)
  return out


def _check_params(config: QwenConfig, params: dict) -> None:
  want = param_shapes(config)
  for leaf in _leaf_paths(config):
    try:
      got = tuple(_get(params, leaf).shape)
    except (KeyError, TypeError) as e:
      raise ValueError(f"params: missing leaf {leaf!r} (expected shape {_get(want, leaf)})") from e
    if got != _get(want, leaf):
      raise ValueError(f"params: leaf {leaf!r} has shape {got}, expected {_get(want, leaf)}")


def _shard_name(i: int, n: int) -> str:
  return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _remove_stale(path: str) -> None:
  """Drops an earlier export in `path`, so a stale index cannot point at old shards."""
  for f in glob.glob(os.path.join(path, "model-*-of-*.safetensors")) + [
      os.path.join(path, SINGLE_FILE),
      os.path.join(path, INDEX_FILE),
  ]:
    if os.path.isfile(f):
      os.remove(f)


def save_hf(
    path: str,
    config: QwenConfig,
    params: dict,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype=None,
    read_leaf: Callable[[str], np.ndarray] | None = None,
) -> None:
  """Writes `config.json` + safetensors (HF names, unfused) that transformers loads.

  Tensors are written in `dtype` (default: the embedding's dtype). More than
  `max_shard_size` bytes of tensors go to numbered shards plus `model.safetensors.index.json`.
  Tied models write no `lm_head.weight`. With several hosts all must call; host 0 writes.
  `read_leaf(path)` ("embed", "layers/qkv", ...) fetches a leaf's values when `params`
  only describes them (e.g. `jax.ShapeDtypeStruct`s of a checkpoint): one leaf is on the
  host at a time either way.
  """
  _check_params(config, params)
  np_dtype = np.dtype(dtype if dtype is not None else _get(params, "embed").dtype)
  d = _dims(config)
  entries = _expected(config)
  shard_of = _plan_shards(entries, d, np_dtype.itemsize, max_shard_size)
  n_shards = shard_of[-1] + 1
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    _remove_stale(path)
  pending: dict[str, np.ndarray] = {}
  leaf, host = None, None
  for i, entry in enumerate(entries):
    if entry.rule.leaf != leaf:  # entries are in leaf order: one leaf on the host at a time
      leaf, host = entry.rule.leaf, None
      host = (read_leaf(leaf) if read_leaf else _to_host(_get(params, leaf)))
      host = host.astype(np_dtype, copy=False)
    pending[entry.name] = _hf_tensor(host, entry, d)
    if i + 1 == len(entries) or shard_of[i + 1] != shard_of[i]:
      if writer:
        fname = os.path.join(path, _shard_name(shard_of[i], n_shards))
        save_file(pending, fname, metadata={"format": "pt"})
      pending = {}
  del host
  if writer:
    if n_shards > 1:
      index = {
          "metadata": {"total_size": sum(math.prod(e.rule.hf_shape(d)) for e in entries)
                       * np_dtype.itemsize},
          "weight_map": {e.name: _shard_name(s, n_shards) for e, s in zip(entries, shard_of)},
      }
      with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config.to_hf_dict(np_dtype.name), f, indent=2)

