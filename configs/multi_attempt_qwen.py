"""Multi-attempt PPO on MATH level 3-5 (Chung, Du, Fu 2025), the paper's settings.

  python -m mar.main --config=configs/multi_attempt_qwen.py \
      --config.model.path=/ckpt/Qwen2.5-Math-1.5B \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/ma
Variant `:eval` evaluates accuracy vs attempts (k = 1..4) of config.model.path (or of the
workdir's checkpoint `eval.checkpoint_step`, -1 = latest).

Where each value comes from (METHODS.md §1; "ref" = the paper's OpenRLHF fork):
  1024 prompts per rollout, 128 sequences per optimizer step -> 8 mini-batches, 1 epoch  ref
  N ~ U{1..5} per episode, temperature 1.0, generation <= 3000 shared by the attempts     paper
  prompt <= 1024 tokens                                                                 ref
  gamma 1, lambda 0.99, clip 0.2, value clip 0.2, KL 0.01 * k3 in the loss                 ref
  actor LR 5e-7, critic LR 1e-5, cosine, 3 % warm-up to 0.1 LR, Adam (0.9, 0.95), wd 0     ref
  grad clip 1.0, 1280 iterations                                                        ref
  attempts end at the first closed \\boxed{} (rollout.stop_at_box)                         ref
  eval: greedy, a separate run per k = 1..4 with the prompt stating k, 5 benchmarks       paper
Ours: batch_size (rows decoding together; the 1024 episodes are one queue over them), micro-batches,
bf16 + remat, the mesh.
"""

from mar.defaults import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = "ppo"
  c.train.num_steps = 1280
  c.rollout.update(dict(prompts_per_step=1024, batch_size=256, prompt_len=1024,
                        token_budget=3000, max_attempts=5, attempts="uniform",
                        prompt="multi_attempt", temperature=1.0, stop_at_box=True))
  c.ppo.update(dict(gamma=1.0, lam=0.99, clip=0.2, value_clip=0.2, kl_coef=0.01,
                    actor_lr=5e-7, critic_lr=1e-5, mini_batches=8, micro_batches=16))
  c.optim.update(dict(warmup_ratio=0.03, min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.0,
                      grad_clip=1.0))
  c.model.dtype = "bfloat16"
  c.export.at_end = True  # RUN/hf/: the trained policy for vLLM and other harnesses
  c.model.remat = True
  c.data.train = "../shared/data/train/math_lvl3to5_8k.jsonl"
  c.eval.update(dict(benchmarks=("aime24", "math500", "amc23", "minerva_math", "olympiadbench"),
                     kinds=("attempts",), max_attempts=4, every_steps=100, batch_size=128,
                     stop_at_box=True))
  c.checkpoint.every_steps = 20
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  if arg == "eval":
    c.mode = "eval"
  elif arg:
    raise ValueError(f"configs/multi_attempt_qwen.py: unknown variant {arg!r} (expected 'eval')")
  return c
