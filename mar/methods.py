"""The registry of training methods: the one place that reads `config.method`.

A method belongs to one of two algorithm families (`mar.algorithms`):
  ppo    multi-attempt PPO and single-turn PPO (M = 1): an actor and a critic, GAE over
         dialogues; one episode per prompt, `config.ppo` holds its hyper-parameters;
  group  GRPO and its variants (Dr.GRPO, clip-higher, DAPO: `grpo.estimator`, `grpo.agg`,
         clip and dynamic-sampling keys), "GRPO + extra rollouts" and LTE: G single-turn
         samples per prompt, `config.grpo`; they differ only in what a none-pass group
         gets re-sampled with (`resample`): nothing, G more plain samples, or G samples
         under LTE's hint of its own wrong answers.
Everything that depends on the method asks the `Method` record here (sizes, keys, the
re-sampling rule) or its family's module (learner, iteration); nothing else compares
`config.method` to a string.
"""

from __future__ import annotations

import dataclasses

from mar import config_utils


@dataclasses.dataclass(frozen=True)
class Method:
  name: str  # config.method
  family: str  # "ppo" | "group"
  resample: str = "none"  # group family: what a none-pass group gets ("none", "plain", "hints")

  @property
  def is_ppo(self) -> bool:
    return self.family == "ppo"

  @property
  def hparams_key(self) -> str:
    """The config section of the family's hyper-parameters."""
    return "ppo" if self.is_ppo else "grpo"

  def hparams(self, config):
    return config[self.hparams_key]

  def rows_per_prompt(self, config) -> int:
    """Episodes a prompt gets per step: one dialogue (PPO) or a group of G."""
    return 1 if self.is_ppo else int(config.grpo.group_size)

  def max_attempts(self, config) -> int:
    """Attempts a training episode may take (M; the group family samples single turns)."""
    return int(config.rollout.max_attempts) if self.is_ppo else 1

  def policy_lr(self, config) -> float:
    return config.ppo.actor_lr if self.is_ppo else config.grpo.lr

  def needs_reference(self, config) -> bool:
    """Whether the loss has a KL term to a frozen reference policy."""
    return bool(self.hparams(config).kl_coef)


METHODS = {m.name: m for m in (
    Method("ppo", "ppo"),
    Method("grpo", "group", "none"),
    Method("grpo_extra", "group", "plain"),
    Method("lte", "group", "hints"),
)}


def of(config) -> Method:
  """The config's method, or a ConfigError naming the key and the choices."""
  try:
    return METHODS[config.method]
  except KeyError:
    raise config_utils.ConfigError(
        f"config.method={config.method!r}: expected one of {sorted(METHODS)}") from None
