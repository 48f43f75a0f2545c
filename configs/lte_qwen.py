"""LTE: GRPO whose none-pass groups are re-sampled with hints of their own wrong answers.

  python -m mar.main --config=configs/lte_qwen.py --config.model.path=/ckpt/Qwen3-8B-Base \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/lte
Variant `:entropy` is LTE-dagger (+ entropy bonus 0.001).
"""

from configs.grpo_qwen import get_config as grpo_config


def get_config(arg: str | None = None):
  c = grpo_config("eval" if arg == "eval" else None)
  c.method = "lte"
  if arg == "entropy":
    c.grpo.entropy_coef = 0.001
  return c
