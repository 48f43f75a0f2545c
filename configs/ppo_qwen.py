"""Single-turn PPO baseline of the multi-attempt paper (N = 1, plain system prompt).

Everything of configs/multi_attempt_qwen.py (the paper's PPO settings) with N = 1 and the
system prompt `Please reason step by step, and put your final answer within \boxed{}.`
(METHODS.md §1). Its accuracy-vs-k curve is evaluated like the multi-attempt model's, with
the multi-attempt prompt stating k.

  python -m mar.main --config=configs/ppo_qwen.py --config.model.path=/ckpt/Qwen2.5-Math-1.5B \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/ppo
"""

from configs.multi_attempt_qwen import get_config as multi_attempt_config


def get_config(arg: str | None = None):
  c = multi_attempt_config(arg)
  c.rollout.max_attempts = 1
  c.rollout.attempts = "fixed"
  c.rollout.prompt = "single_turn"
  return c
