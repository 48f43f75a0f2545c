"""Random initialisation of a params pytree in the layout of `mar.models.model`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mar.models.config import QwenConfig


def param_shapes(config: QwenConfig) -> dict:
  """Shape of every parameter, keyed like the params pytree."""
  c = config
  l, d, k, r, dh, f = (c.num_layers, c.hidden_size, c.num_kv_heads, c.group_size,
                       c.head_dim, c.intermediate_size)
  layers = {
      "attn_norm": (l, d),
      "qkv": (l, d, k, r + 2, dh),
      "o": (l, k, r, dh, d),
      "mlp_norm": (l, d),
      "gate_up": (l, d, 2, f),
      "down": (l, f, d),
  }
  if c.qkv_bias:
    layers["qkv_bias"] = (l, k, r + 2, dh)
  if c.qk_norm:
    layers["q_norm"] = (l, dh)
    layers["k_norm"] = (l, dh)
  shapes = {"embed": (c.vocab_size, d), "layers": layers, "final_norm": (d,)}
  if not c.tie_word_embeddings:
    shapes["lm_head"] = (d, c.vocab_size)
  return shapes


def _is_norm(path: str) -> bool:
  return path.endswith("norm")


def init_params(config: QwenConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Normal(0, std) weights (biases too), ones for norms, like HF's `_init_weights`."""
  shapes = param_shapes(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = jax.tree_util.keystr(path)
    if _is_norm(name.strip("[]'")):
      leaves.append(jnp.ones(shape, dtype))
    else:
      leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)
