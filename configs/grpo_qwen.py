"""GRPO baseline of the LTE paper: Qwen3-8B-Base, G = 8, 128 prompts per step.

  python -m mar.main --config=configs/grpo_qwen.py --config.model.path=/ckpt/Qwen3-8B-Base \
      --config.data.train=../shared/data/train/math_lvl3to5_8k.jsonl --workdir=/runs/grpo
Variants: `:drgrpo` (no std, constant normaliser), `:clip_higher` (DAPO's clip-higher,
eps_high = 0.28, alone), `:dapo` (all four DAPO techniques, below), `:extra` (GRPO + extra
un-hinted rollouts for none-pass groups), `:eval`.

Where each value comes from (METHODS.md §2; "verl" = verl's defaults the paper ran on):
  G = 8, T = 1.0, 128 prompts per step, mini-batch 64 prompts (2 updates), 1 epoch      paper
  max response 8192, responses run to EOS (rollout.stop_at_box False), EOS trained       paper/verl
  500 steps, LR 1e-6 constant (no warm-up), grad clip 1.0                               paper
  GRPO advantages (R - mean)/(std + 1e-6), token-mean loss, clip 0.2, no KL               paper/verl
  AdamW betas (0.9, 0.999), weight decay 0.01                                           verl
  eval: 16 samples, T = 0.6, top-p 0.95, Pass@1 and Pass@16, six benchmarks, to EOS       paper
Ours: batch_size (rows per rollout program), micro-batches, prompt bucket, bf16 + remat, mesh.

`:dapo` — DAPO (Yu et al. 2025, arXiv:2503.14476) on this GRPO setup. Its four techniques
with DAPO's values:
  clip-higher: eps_low 0.2, eps_high 0.28                                               DAPO
  dynamic sampling: groups whose accuracy is all 0 or all 1 are dropped and more prompts
    are sampled until the batch is full (verl's recipe draws 3 x 512 prompts per batch,
    up to 10 such batches); here over-sampled groups enter the same engine queue, at most
    max_oversample = 2 x prompts_per_step extra (the queue is 3 x the batch)           DAPO/ours
  token-level loss: token_mean over the mini-batch                                       DAPO
  overlong shaping: L_max 20480 with L_cache 4096 (expected length 16384), factor 1.0;
    here the 8192 budget keeps DAPO's 20 % buffer: L_cache 1638; no overlong filtering
    (grpo.mask_truncated False: DAPO's final recipe punishes, it does not filter)      DAPO/ours
DAPO's other published values, NOT taken here (this file keeps the GRPO baseline's): Qwen2.5-32B
base, 512 prompts x 16 responses per step, 16 updates per step (mini-batch 32 prompts), LR
1e-6 with 20 warm-up steps, rewards +1 / -1 (ours 1 / 0: the overlong penalty then weighs
twice as much against the accuracy reward), no KL, eval AIME avg@32 at T 1.0, top-p 0.7.
"""

from mar.defaults import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = "grpo"
  c.train.num_steps = 500
  c.rollout.update(dict(prompts_per_step=128, batch_size=256, prompt_len=1024,
                        token_budget=8192, max_attempts=1, attempts="fixed",
                        temperature=1.0, stop_at_box=False))
  c.grpo.update(dict(group_size=8, estimator="grpo", agg="token_mean", clip_low=0.2,
                     clip_high=0.2, kl_coef=0.0, lr=1e-6, mini_batches=2, micro_batches=64))
  c.optim.update(dict(warmup_ratio=0.0, min_lr_ratio=1.0, b1=0.9, b2=0.999, weight_decay=0.01,
                      grad_clip=1.0))
  c.model.dtype = "bfloat16"
  c.export.at_end = True  # RUN/hf/: the trained policy for vLLM and other harnesses
  c.model.remat = True
  c.data.train = "../shared/data/train/math_lvl3to5_8k.jsonl"
  c.eval.update(dict(benchmarks=("math500", "minerva_math", "olympiadbench", "amc23",
                                 "aime24", "aime25"),
                     kinds=("passk",), num_samples=16, temperature=0.6, top_p=0.95,
                     ks=(1, 16), every_steps=50, batch_size=256, stop_at_box=False))
  c.checkpoint.every_steps = 10
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  if arg == "drgrpo":
    c.grpo.update(dict(estimator="grpo_no_std", agg="seq_mean_token_sum_norm"))
  elif arg == "clip_higher":
    c.grpo.update(dict(clip_high=0.28))
  elif arg == "dapo":
    c.grpo.update(dict(clip_low=0.2, clip_high=0.28, agg="token_mean", dynamic_sampling=True,
                       max_oversample=2, overlong_buffer=1638, overlong_penalty=1.0,
                       mask_truncated=False))
  elif arg == "extra":
    c.method = "grpo_extra"
  elif arg == "eval":
    c.mode = "eval"
  elif arg:
    raise ValueError(f"configs/grpo_qwen.py: unknown variant {arg!r} "
                     "(expected 'drgrpo', 'clip_higher', 'dapo', 'extra' or 'eval')")
  return c
