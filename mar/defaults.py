"""Every config key mar reads, with defaults; experiment files in configs/ override them.

Keys are grouped by the part of the step they steer: model, data, rollout, ppo, grpo,
optim, eval, verify, export (plus seed/train/mesh/checkpoint/metrics from `common_config`).
"""

from ml_collections import ConfigDict

from mar.config_utils import common_config


def base_config() -> ConfigDict:
  c = common_config()
  # Learner batches hold real tokens only: sequences packed into rows of this many slots
  # (-1: the rollout's row width, prompt bucket + token budget); 0: padded rows as sampled.
  c.train.pack_len = -1
  # f32 params and optimizer moments (actor, critic) in pinned host memory while the rollout
  # runs, back for the update (results unchanged): "auto" (when the state and the rollout
  # overflow mesh.hbm_fraction of a device; plan_memory --fit decides from compiled
  # programs), "true" or "false". Where the devices have no host memory kind: a no-op.
  c.train.offload_state = "auto"
  c.mode = "train"  # train | eval
  c.method = "ppo"  # ppo | grpo | lte | grpo_extra
  c.distributed = False  # jax.distributed.initialize() on multi-host launches
  # (logical axis, mesh axes) pairs; empty = mar.models.sharding.DEFAULT_RULES
  c.sharding_rules = ()

  c.model = ConfigDict(dict(path="", dtype="float32", remat=False))
  c.model.demo = ConfigDict(dict(enabled=False, sft_steps=0))

  c.data = ConfigDict(dict(dir="../shared/data", train="", question_key="prompt",
                           answer_key="answer"))
  c.data.answer_from_solution = False  # gold = the last \boxed{} of the answer field
  c.data.tfds_dir = ""  # data_dir of `tfds:` sources; "" = TFDS's default (~/tensorflow_datasets)
  # Per-benchmark source (`path.jsonl`, `.parquet`, shard folder, `tfds:NAME/CONFIG:SPLIT`);
  # "" = `<data.dir>/<name>/test.jsonl`.
  c.data.benchmarks = ConfigDict(dict(math500="", aime24="", aime25="", amc23="",
                                      minerva_math="", olympiadbench="", gsm8k=""))
  # num_operands / ops: "a+b-c" style multi-step questions (mar.data.synthetic)
  c.data.synthetic = ConfigDict(dict(enabled=False, num_examples=0, seed=0, min_digits=1,
                                     max_digits=2, num_operands=2, ops="+-"))

  c.rollout = ConfigDict(dict(
      prompts_per_step=8,  # prompts per training step (PPO: episodes; GRPO: groups)
      batch_size=0,  # rows per rollout program; 0 = the step's episodes (prompts x G for GRPO)
      prompt_len=256,  # largest left-padded prompt bucket (smaller: powers of two from 64)
      token_budget=512,  # generated tokens shared by all attempts
      max_attempts=5,  # M
      attempts="uniform",  # uniform: N ~ U{1..M} per episode; fixed: N = M
      prompt="multi_attempt",  # multi_attempt | single_turn (PPO prompt style)
      temperature=1.0, top_p=1.0, top_k=0,
      check_every=1,  # boxed-stop check period (the reference checks every 64 tokens)
      # True: an attempt ends at its first closed \boxed{} (multi-attempt's rule). False: run
      # to EOS or the budget, the EOS kept as a trained action (verl / LTE).
      stop_at_box=True,
      hint_feedback_len=0,  # > 0: hybrid, feedback turns list the wrong answers so far
      # The engine runs the step's episodes as one queue over B rows, with in-program
      # refills and per-row turns (rows split over rollout.mesh.data, except multi-attempt
      # with rollout.mesh.tensor > 1).
      refill_rows=0,  # rows one in-program refill prefills; 0 = batch_size // 16 (>= 1)
      refill_wait=16,  # decode steps a freed row may wait for others before a refill
      verify_every=8,  # decode steps between the engine's verification checks
  ))
  # The rollout's own layout: rows (and KV cache) over `data`, weights (in the sampling
  # dtype) replicated or tensor-parallel over `tensor`; -1 = the devices left over.
  c.rollout.mesh = ConfigDict(dict(data=-1, tensor=1))

  # tis_cap > 0: token-level truncated importance weights min(pi_old / pi_sampler, C) on
  # the policy loss (rollout correction: the rollout samples in its own dtype and layout);
  # 0 = off. The rollout/logp_gap_*, k3_kl and tis_* metrics are logged either way.
  c.ppo = ConfigDict(dict(gamma=1.0, lam=0.99, clip=0.2, value_clip=0.2, kl_coef=0.01,
                          kl_name="k3", kl_clamp=10.0, actor_lr=5e-7, critic_lr=1e-5,
                          mini_batches=1, micro_batches=1, tis_cap=0.0))
  c.grpo = ConfigDict(dict(group_size=8, estimator="grpo", agg="token_mean", clip_low=0.2,
                           clip_high=0.2, kl_coef=0.0, kl_name="k3", entropy_coef=0.0,
                           shaping_gamma=0.1, separate_norm=False, lr=1e-6,
                           cap=-1,  # -1: G - 1
                           mini_batches=1, micro_batches=1, tis_cap=0.0))
  # DAPO (METHODS.md §3; configs/grpo_qwen.py:dapo). dynamic_sampling: further prompts
  # (next in the data order) join the same engine queue until prompts_per_step groups have
  # unequal rewards, at most max_oversample x prompts_per_step extra groups (one process,
  # continuous engine); groups with equal rewards are never trained on (LTE: a none-pass
  # group is kept and hinted). overlong_buffer > 0: DAPO's soft length penalty (up to
  # -overlong_penalty) over the last overlong_buffer tokens of the budget; mask_truncated:
  # truncated responses leave the loss.
  c.grpo.update(dict(dynamic_sampling=False, max_oversample=2, overlong_buffer=0,
                     overlong_penalty=1.0, mask_truncated=False))
  c.optim = ConfigDict(dict(warmup_ratio=0.03, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                            weight_decay=0.0, grad_clip=1.0))
  # The LR schedule spans train.num_steps x (mini-batches per step) optimizer updates.

  c.eval = ConfigDict(dict(
      # Sequence keys are tuples so the command line can set them:
      # --config.eval.benchmarks=aime24,math500  --config.eval.ks='(1,8)'
      benchmarks=("math500",), kinds=("attempts",), every_steps=0, at_start=True, at_end=True,
      max_attempts=4, num_samples=16, temperature=0.6, top_p=0.95, ks=(1, 16),
      # Low-variance twins (mar/evaluate.py): m sampled episodes per problem and k beside
      # each greedy attempt run (0 = off), and the teacher-forced expected accuracy.
      attempt_samples=0, expected_accuracy=False,
      max_problems=0, batch_size=16,
      checkpoint_step=-1,  # eval mode: -1 = the latest checkpoint, else exactly this step
      stop_at_box=True))  # as rollout.stop_at_box, for evaluation runs
  c.eval.synthetic = ConfigDict(dict(num_examples=0, seed=1, min_digits=1, max_digits=2,
                                     num_operands=2, ops="+-"))
  # LTE hints (METHODS.md §2): answers are quoted whole unless hint_max_chars > 0; answers are
  # dropped from the end only when the hinted prompt does not fit rollout.prompt_len.
  c.lte = ConfigDict(dict(hint_max_chars=0, hint_sep=", "))
  c.verify = ConfigDict(dict(workers=2, timeout=3.0))
  # Weights & Biases: the same scalars as TensorBoard, the resolved config, eval tables and
  # plots (mar.wandb_sink; WANDB_MODE=offline writes a run folder under <workdir>/wandb).
  c.metrics.wandb = False
  c.metrics.wandb_project = "mar"
  c.metrics.wandb_entity = ""  # "" = the account's default
  # The trained policy as an HF folder at RUN/hf/ when training ends (mar.tools.export_hf).
  c.export = ConfigDict(dict(at_end=False, dtype="bfloat16",
                             max_shard_size=5 * 10**9))  # bytes per safetensors file
  return c
