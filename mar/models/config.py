"""Model configuration for Qwen2 / Qwen2.5 / Qwen3, read from an HF `config.json`.

One frozen dataclass drives the single model definition: Qwen2 has q/k/v biases,
Qwen3 has per-head q/k RMSNorm and an explicit `head_dim`. The dataclass is hashable
so it can be a static argument of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Architecture hyper-parameters plus the compute-dtype policy."""

  model_type: str = "qwen2"
  vocab_size: int = 151936
  hidden_size: int = 1536
  intermediate_size: int = 8960
  num_layers: int = 28
  num_heads: int = 12
  num_kv_heads: int = 2
  head_dim: int = 128
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 4096
  torch_dtype: str = "bfloat16"  # what the checkpoint says; informational
  # Compute policy: activations and matmuls run in `dtype`; logits are always f32.
  dtype: Any = jnp.float32
  remat: bool = False
  # Cached attention reads the KV cache in blocks of this many slots, only up to the live
  # length (a loop with a traced trip count), when the cache holds more than one block.
  attn_block: int = 256
  # Training meshes only: where FSDP-split weights are gathered for their layer
  # (`mar.models.fsdp.FsdpLayout`, set by `sharding.with_fsdp` for the learners); None: as stored.
  fsdp: Any = None

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.model_type == "qwen3"

  @property
  def group_size(self) -> int:
    """Query heads per KV head (the GQA ratio)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "QwenConfig":
    return dataclasses.replace(self, **kw)

  # ----- HF config.json ------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict, source: str = "config.json") -> "QwenConfig":
    """Builds a config from an HF config dict (transformers 4 or 5 layout)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"{source}: unsupported model_type {model_type!r}; "
          f"expected one of {SUPPORTED_MODEL_TYPES}"
      )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in d:
        raise ValueError(f"{source}: missing required field {key!r}")
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise ValueError(
          f"{source}: num_attention_heads={heads} is not a multiple of "
          f"num_key_value_heads={kv_heads}"
      )
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    # transformers 5 moved rope_theta into `rope_parameters`; real checkpoints keep it
    # at the top level. Never assume a default per family (Qwen3 ships 1e6 and 5e6).
    rope = d.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", (d.get("rope_scaling") or {}).get("type", "default"))
    if rope_type not in ("default", None):
      raise ValueError(f"{source}: rope scaling {rope_type!r} is not supported")
    return cls(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
    )

  @classmethod
  def from_hf_dir(cls, path: str) -> "QwenConfig":
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{cfg_path}: no config.json in the model folder {path!r}")
    with open(cfg_path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    return cls.from_hf_dict(d, source=cfg_path)

  def to_hf_dict(self, dtype: str = "float32") -> dict:
    """The HF config.json that `transformers` loads back into the same architecture."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
    return {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "attention_bias": self.qkv_bias,
        "use_sliding_window": False,
        "torch_dtype": dtype,
        "dtype": dtype,
    }

  # ----- presets (shapes of the released checkpoints) -----------------------------

  @classmethod
  def qwen2_5_math_1_5b(cls) -> "QwenConfig":
    return cls("qwen2", 151936, 1536, 8960, 28, 12, 2, 128, 10000.0, 1e-6, True, 4096)

  @classmethod
  def qwen2_5_7b(cls) -> "QwenConfig":
    return cls("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 1e6, 1e-6, False, 131072)

  @classmethod
  def qwen3_4b_base(cls) -> "QwenConfig":
    return cls("qwen3", 151936, 2560, 9728, 36, 32, 8, 128, 1e6, 1e-6, True, 32768)

  @classmethod
  def qwen3_8b_base(cls) -> "QwenConfig":
    return cls("qwen3", 151936, 4096, 12288, 36, 32, 8, 128, 1e6, 1e-6, False, 32768)

  @classmethod
  def tiny(cls, model_type: str = "qwen3", vocab_size: int = 512) -> "QwenConfig":
    """A few-layer model for CPU tests and the demo."""
    return cls(model_type, vocab_size, 128, 352, 2, 4, 2, 32, 10000.0, 1e-6, True, 512)


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


PRESETS = {
    "qwen2_5_math_1_5b": QwenConfig.qwen2_5_math_1_5b,
    "qwen2_5_7b": QwenConfig.qwen2_5_7b,
    "qwen3_4b_base": QwenConfig.qwen3_4b_base,
    "qwen3_8b_base": QwenConfig.qwen3_8b_base,
}
