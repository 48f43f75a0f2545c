"""The algorithm families: what a training step does once the method is known.

`mar.methods.of(config)` names the method and its family; `family(config)` returns the
family's module, and both modules provide the same interface:
  make_learner(config, model_config, mesh, rules)   the learner and its update programs
  optimizers(learner), make_critic(...)              its optimizers; PPO's value model
  init_state(config, run)                            the checkpointed pytree
  examples_per_step(config)                          data positions a step draws
  training_prompts(config, question)                 every first-turn text training builds
  iteration(config, run, state, examples, step)      one step -> (state, metrics)
Modules:
  ppo.py      multi-attempt / single-turn PPO (the rollout's `Episodes` go to the learner)
  group.py    GRPO and its variants, GRPO + extra rollouts, LTE: G samples per prompt, the
              none-pass groups re-sampled by the method's rule (`Method.resample`)
  refined.py  the group family's learner batch: LTE's hints that fit, hinted log-probs,
              refined groups, DAPO's length rules
  common.py   what both iterations share (the step's PRNG key, the host's share of a step)
"""

from __future__ import annotations

from mar import methods
from mar.algorithms import group
from mar.algorithms import ppo


def family(config):
  """The module of the config's algorithm family (`mar.algorithms.ppo` or `.group`)."""
  return ppo if methods.of(config).is_ppo else group
