"""Hybrid (new, in neither paper): multi-attempt PPO whose feedback turn carries LTE's hint.

After a wrong attempt the system turn says so, how many attempts are left, and lists the
episode's wrong answers so far ("Hint: possible incorrect answers include 2, 4").
  python -m mar.main --config=configs/hybrid_qwen.py --config.model.path=/ckpt/Qwen2.5-Math-1.5B \
      --workdir=/runs/hybrid
"""

from configs.multi_attempt_qwen import get_config as multi_attempt_config


def get_config(arg: str | None = None):
  c = multi_attempt_config(arg)
  c.rollout.hint_feedback_len = 96
  return c
