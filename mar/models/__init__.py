"""Qwen2 / Qwen2.5 / Qwen3 in JAX, with HF safetensors import and export."""

from mar.models.config import PRESETS, QwenConfig
from mar.models.hf_io import load_hf, save_hf
from mar.models.init import init_params, param_shapes
from mar.models.model import (
    KVCache,
    forward,
    forward_cached,
    hidden_states,
    init_cache,
    init_value_head,
    logits_from_hidden,
    value_forward,
)
