"""Multi-attempt PPO on MATH level 3-5 (Chung, Du, Fu 2025), the paper's settings.

  python -m mar.main --config=configs/multi_attempt_qwen.py \
      --config.model.path=/ckpt/Qwen2.5-Math-1.5B \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/ma
Variant `:eval` evaluates accuracy vs attempts (k = 1..4) of config.model.path only.
"""

from mar.defaults import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = "ppo"
  c.train.num_steps = 1280
  c.rollout.update(dict(prompts_per_step=1024, batch_size=256, prompt_len=1024,
                        token_budget=3000, max_attempts=5, attempts="uniform",
                        prompt="multi_attempt", temperature=1.0))
  c.ppo.update(dict(gamma=1.0, lam=0.99, clip=0.2, value_clip=0.2, kl_coef=0.01,
                    actor_lr=5e-7, critic_lr=1e-5, mini_batches=8, micro_batches=16))
  c.optim.updates_per_step = 8  # 1024 episodes / 128 per optimizer step
  c.model.dtype = "bfloat16"
  c.export.at_end = True  # RUN/hf/: the trained policy for vLLM and other harnesses
  c.model.remat = True
  c.data.train = "../shared/data/train/math_lvl3to5_8k.jsonl"
  c.eval.update(dict(benchmarks=["aime24", "math500", "amc23", "minerva_math", "olympiadbench"],
                     kinds=["attempts"], max_attempts=4, every_steps=100, batch_size=128))
  c.checkpoint.every_steps = 20
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  if arg == "eval":
    c.mode = "eval"
  return c
