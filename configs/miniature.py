"""The papers' comparisons in miniature: every arm on one task, one warm start, one budget.

  python -m mar.tools.replicate --suite=miniature --workdir=/tmp/mar_mini   # all arms, seeds
  python -m mar.main --config=configs/miniature.py:lte --workdir=/tmp/lte  # one arm alone
Arms (the variant after the colon): `multi_attempt` (multi-attempt PPO, N ~ U{1..2}) and
`single_turn` (single-turn PPO), both evaluated by accuracy with k = 1..4 attempts stated in
the multi-attempt prompt; `grpo`, `grpo_extra` ("GRPO + extra rollouts": none-pass groups get
G more plain samples) and `lte`, evaluated by Pass@1 / Pass@8 during training. Append
`,tiny` (e.g. `lte,tiny`) for the seconds-long settings of the suite's test.

The task: two operands of 1 digit ("What is 7-9?"), warm-started for 200 SFT steps.
How it was chosen (the criterion fixed before any RL run): the warm start's step-0 accuracy
at k = 1 (greedy, the multi-attempt prompt stating one attempt: the PPO arms' evaluation,
256 problems) must lie between 20 % and 60 %, so a second attempt and a hint have something
to work with and something left to gain. Candidates, probed in this order by building the
warm start and evaluating it only (`--config.mode=eval`), the first that meets it taken:
(a) two operands of 1-2 digits: 4.7 %; (b) three operands of 1 digit: 14.5 %; (c) two
operands of 1 digit (the demo's task): 91.0 %. None met it, so three more, each declared
before it was probed: (d) task (c) with sft_steps=150 instead of 400: 16.8 %; (e) three
operands of 1 digit, "+" only: 97.3 %; (f) task (c) with sft_steps=200: 20.3 % -> taken.
(The list first named two operands of 2 digits third; after (a) showed 2-digit operands too
hard for this model it was replaced by (c), before any RL run.) The earlier choice, three
operands of 1-2 digits, gave 0.8 %, too hard for any method to show anything. The RL sizes
(24 steps, evaluations every 8) were set before any RL run of this task, to stay under ~30 CPU minutes
over 5 arms x 3 seeds.
The warm start (`model.demo.style = "neutral"`, mar/demo.py) is identical for every arm and every
RL seed (`model.demo.seed` is pinned): it only ever targets the correct answer, under each of
the prompts the arms use, and shows wrong answers as context only (a failed attempt before
the feedback turn, or in a hint), so neither method is taught its own answer.
"""

from mar.defaults import base_config

ARMS = ("multi_attempt", "single_turn", "grpo", "grpo_extra", "lte")
PPO_ARMS = ("multi_attempt", "single_turn")
GROUP_ARMS = ("grpo", "grpo_extra", "lte")
# The synthetic task of every arm, training and evaluation (see the docstring for the choice).
TASK = dict(min_digits=1, max_digits=1, num_operands=2, ops="+-")
# The design of record (docstring): budget, evaluation sizes.
NUM_STEPS = 24
EVAL_EVERY = 8
EVAL_PROBLEMS = 128
ATTEMPT_SAMPLES = 16  # sampled episodes per problem and k (PPO arms)
PASSK_SAMPLES = 32  # samples per problem (GRPO-family arms)
PASSK_K = 8  # the k of the LTE claim's Pass@k


def get_config(arg: str | None = None):
  arm, *mods = (arg or "multi_attempt").split(",")
  if arm not in ARMS or any(m != "tiny" for m in mods):
    raise ValueError(f"configs/miniature.py: variant {arg!r}; expected one of {ARMS}, "
                     "optionally followed by ',tiny'")
  c = base_config()
  c.model.demo = dict(enabled=True, vocab_size=512, sft_steps=200, sft_batch=64, sft_len=128,
                      sft_lr=3e-3, p_wrong=0.5, wrong_deltas=(-10, -1, 1, 10),
                      style="neutral", sft_attempts=4, seed=0)
  task = dict(TASK)
  c.data.synthetic = dict(enabled=True, num_examples=4096, seed=0, **task)
  c.eval.synthetic = dict(num_examples=256, seed=12345, **task)
  c.rollout.update(dict(prompt_len=128, temperature=1.0))
  c.optim.update(dict(warmup_ratio=0.05))
  c.checkpoint.update(dict(every_steps=8, keep=2))
  c.verify.workers = 2
  c.train.num_steps = NUM_STEPS
  if arm in PPO_ARMS:
    _ppo_arm(c, arm)
  else:
    _group_arm(c, arm)
  if mods:
    _tiny(c)
  return c


def _ppo_arm(c, arm: str) -> None:
  c.method = "ppo"
  c.rollout.update(dict(prompts_per_step=64, prompt_len=64, token_budget=48, max_attempts=2,
                        attempts="uniform", prompt="multi_attempt"))
  if arm == "single_turn":
    c.rollout.update(dict(max_attempts=1, attempts="fixed", prompt="single_turn"))
  c.ppo.update(dict(actor_lr=3e-4, critic_lr=1e-3, kl_coef=0.01, mini_batches=2))
  # Both arms: accuracy with k attempts, the multi-attempt prompt stating k (METHODS.md §1),
  # greedy and sampled EVAL_SAMPLES times per problem at the training temperature.
  c.eval.update(dict(benchmarks=("synthetic",), kinds=("attempts",), max_attempts=2,
                     attempt_samples=ATTEMPT_SAMPLES, batch_size=256, every_steps=EVAL_EVERY,
                     temperature=1.0, top_p=1.0, expected_accuracy=True))
  c.eval.synthetic.num_examples = EVAL_PROBLEMS


def _group_arm(c, arm: str) -> None:
  c.method = arm
  # LTE's rule for GRPO-family rollouts and Pass@k: run to EOS (the warm start trains it).
  c.rollout.update(dict(prompts_per_step=16, token_budget=24, max_attempts=1,
                        attempts="fixed", stop_at_box=False))
  c.grpo.update(dict(group_size=8, lr=3e-4))
  c.eval.update(dict(benchmarks=("synthetic",), kinds=("passk",), num_samples=PASSK_SAMPLES,
                     ks=(1, PASSK_K), batch_size=256, every_steps=EVAL_EVERY, stop_at_box=False,
                     temperature=1.0, top_p=1.0, expected_accuracy=True))
  c.eval.synthetic.num_examples = EVAL_PROBLEMS


def _tiny(c) -> None:
  """Seconds per arm: a few SFT and RL steps, a handful of eval problems."""
  c.model.demo.update(dict(sft_steps=4, sft_batch=8))
  c.train.num_steps = 2
  c.data.synthetic.num_examples = 64
  c.eval.synthetic.num_examples = 8
  c.eval.update(dict(batch_size=16, every_steps=1 if c.method != "ppo" else 0,
                     attempt_samples=2, num_samples=4, ks=(1, 4)))
  c.checkpoint.every_steps = 1
  c.verify.workers = 1
  if c.method == "ppo":
    c.rollout.prompts_per_step = 8
  else:
    c.rollout.prompts_per_step = 2
    c.grpo.group_size = 4
