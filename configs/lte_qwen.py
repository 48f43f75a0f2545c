"""LTE: GRPO whose none-pass groups are re-sampled with hints of their own wrong answers.

  python -m mar.main --config=configs/lte_qwen.py --config.model.path=/ckpt/Qwen3-8B-Base \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/lte
Variant `:entropy` is LTE-dagger (+ entropy bonus 0.001); `:eval` evaluates.

Everything of configs/grpo_qwen.py (the paper's GRPO settings), plus (METHODS.md §2):
  hints list the distinct wrong answers whole (lte.hint_max_chars = 0), separated by ", "
  (the paper draws them as boxes); answers are dropped only if the prompt would not fit
  correct hinted samples replace failures, at most G - 1 per group (grpo.cap = -1; ours)
  hinted tokens: f(r) = r / (r + 0.1) shaping, no clipping (grpo.shaping_gamma)         paper
"""

from configs.grpo_qwen import get_config as grpo_config


def get_config(arg: str | None = None):
  if arg not in (None, "", "entropy", "eval"):
    raise ValueError(f"configs/lte_qwen.py: unknown variant {arg!r} (expected 'entropy' or 'eval')")
  c = grpo_config("eval" if arg == "eval" else None)
  c.method = "lte"
  c.lte.update(dict(hint_max_chars=0, hint_sep=", "))
  if arg == "entropy":
    c.grpo.entropy_coef = 0.001
  return c
