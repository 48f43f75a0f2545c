"""A run's policy as an HF folder that transformers, vLLM and other harnesses load.

  python -m mar.tools.export_hf --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16]

Writes `model.safetensors` (numbered shards plus an index above `--max_shard_size`),
`config.json`, `generation_config.json` and the run's tokenizer files. The checkpoint's
policy is read one array at a time (orbax partial restore, cast while reading), so the
host never holds more than one parameter leaf plus one shard of output, and a checkpoint
written on any mesh reads the same. The PPO critic and optimizer states are not read.
`config.export.at_end` writes `RUN/hf/` from the trained params when training ends
(`mar.export`, the library half).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import ml_collections

from mar import checkpoint
from mar import config_utils
from mar import demo
from mar import export
from mar.models import hf_io
from mar.models.config import QwenConfig

POLICY = "policy"


def run_model_path(workdir: str, run_config: dict) -> str:
  """The HF folder a run started from (its architecture and tokenizer).

  A demo run's model is the warm start `mar.demo` keeps in `$MAR_CACHE` (rebuilt from the
  run's config if the cache was cleared), or `<workdir>/demo_model` for runs made before the
  cache existed.
  """
  model = run_config.get("model", {})
  if model.get("demo", {}).get("enabled"):
    return demo.ensure_demo_model(ml_collections.ConfigDict(run_config), workdir)
  path = model.get("path", "")
  if not path:
    raise ValueError(f"{os.path.join(workdir, config_utils.CONFIG_FILE)}: model.path is empty")
  return path


def read_run_config(workdir: str) -> dict:
  path = os.path.join(workdir, config_utils.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no run config (is {workdir!r} a mar run directory?)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def export_checkpoint(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16",
                      max_shard_size: int = hf_io.DEFAULT_MAX_SHARD_SIZE,
                      model_path: str | None = None) -> str:
  """Writes the policy of checkpoint `step` (latest committed by default) as an HF folder."""
  model_path = model_path or run_model_path(workdir, read_run_config(workdir))
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  steps = checkpoint.committed_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint step {step}; found {steps}")
  stored = checkpoint.state_metadata(ckpt_dir, step)
  if POLICY not in stored:
    raise ValueError(f"{ckpt_dir}/{step}: state has no {POLICY!r} (found {sorted(stored)})")
  cfg = QwenConfig.from_hf_dir(model_path)

  def read_leaf(leaf: str):
    keys = (POLICY, *leaf.split("/"))
    return checkpoint.read_state_leaf(ckpt_dir, step, keys, dtype=dtype)

  try:
    hf_io.save_hf(out, cfg, stored[POLICY], max_shard_size=max_shard_size, dtype=dtype,
                  read_leaf=read_leaf)
  except ValueError as e:  # a shape mismatch: name the checkpoint and the model folder
    raise ValueError(f"{ckpt_dir}/{step} does not fit {model_path}: {e}") from e
  export.write_side_files(model_path, out)
  logging.info("exported %s step %d to %s (%s)", ckpt_dir, step, out, dtype)
  return out


def _define_flags() -> None:
  """Flags of the command (defined only when run as a program: mar.main has --workdir too)."""
  flags.DEFINE_string("workdir", None, "Run directory (holds checkpoints/).")
  flags.DEFINE_string("out", None, "Output HF folder.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest finished one.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                    "dtype of the written tensors.")
  flags.DEFINE_integer("max_shard_size", hf_io.DEFAULT_MAX_SHARD_SIZE,
                       "Bytes per safetensors file before sharding with an index.")
  flags.DEFINE_string("model", None, "HF folder the run started from (default: the run "
                      "config's model.path, or the demo model).")
  flags.mark_flags_as_required(["workdir", "out"])


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  export_checkpoint(f.workdir, f.out, step=f.step, dtype=f.dtype,
                    max_shard_size=f.max_shard_size, model_path=f.model)


if __name__ == "__main__":
  _define_flags()
  app.run(_main)
