"""Builds everything a run needs from its config: model, tokenizer, data, verifier, learners.

Nothing downloads: the model and tokenizer come from `config.model.path` (a local HF
folder), the data from `config.data.*` paths. The demo builds its own tiny model folder
first (`mar.demo`), so the same loading code runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from mar import algorithms
from mar import config_utils
from mar import methods
from mar import models
from mar import overlap
from mar import parallel
from mar.data import sources
from mar.data.tokenizer import Tokenizer
from mar.lte import hints
from mar.rollout.runner import RolloutRunner
from mar.rollout import shape as rollout_shape
from mar.sampling import SamplingParams
from mar.verify import BatchVerifier


@dataclasses.dataclass
class Run:
  model_config: models.QwenConfig
  tokenizer: Tokenizer
  params: Any
  ref: Any
  critic: Any  # PPO's value model (None for the group family)
  actor_opt: Any
  critic_opt: Any
  learner: Any
  runner: RolloutRunner
  train_data: list
  verifier: BatchVerifier
  _eval_runners: dict = dataclasses.field(default_factory=dict)
  mesh: Any = None  # the ('data', 'fsdp', 'tensor') mesh everything is placed on
  skipped_long_prompts: int = 0  # training examples whose prompt exceeds rollout.prompt_len
  # When the device was busy (the trainer's host critical-path share); fed by the runner.
  timeline: overlap.DeviceTimeline = dataclasses.field(default_factory=overlap.DeviceTimeline)

  def eval_runner(self, config, kind: str) -> RolloutRunner:
    """Greedy multi-attempt runner ('attempts') or the sampling runner ('passk'), cached."""
    if kind not in self._eval_runners:
      e, attempts = config.eval, kind == "attempts"
      self._eval_runners[kind] = _runner(
          config, self.model_config, self.tokenizer, self.verifier, rows=e.batch_size,
          max_attempts=e.max_attempts if attempts else 1,
          sampling=(SamplingParams(temperature=0.0) if attempts else
                    SamplingParams(temperature=e.temperature, top_p=e.top_p)),
          hint_feedback_len=config.rollout.hint_feedback_len if attempts else 0,
          stop_at_box=e.stop_at_box, mesh=self.mesh, sampling_mesh=self.runner.sampling_mesh,
          sampling_dtype=self.runner.sampling_dtype)
    return self._eval_runners[kind]

  def close(self):
    self.verifier.close()


def _runner(config, cfg, tokenizer, verifier, *, rows: int, max_attempts: int, sampling,
            hint_feedback_len: int, stop_at_box: bool, **kw) -> RolloutRunner:
  """A rollout runner with the config's prompt, budget and engine keys (training's and the
  evaluations' differ only in the keyword arguments)."""
  r = config.rollout
  return RolloutRunner(
      cfg, tokenizer, verifier, batch_size=rows, prompt_len=r.prompt_len,
      max_attempts=max_attempts, token_budget=r.token_budget, sampling=sampling,
      check_every=r.check_every, hint_feedback_len=hint_feedback_len,
      feedback_text=hints.hint_feedback_text, stop_at_box=stop_at_box,
      refill_rows=r.refill_rows, refill_wait=r.refill_wait, verify_every=r.verify_every, **kw)


def load_train_data(config) -> list:
  d = config.data
  if d.get("synthetic") and d.synthetic.enabled:
    from mar.data import synthetic

    return synthetic.examples_from_config(d.synthetic)
  if not d.train:
    config_utils.check_paths(config, ["data.train"])  # says which flag to pass
  return sources.load_train(d.train, question_key=d.question_key, answer_key=d.answer_key,
                            answer_from_solution=d.answer_from_solution, tfds_dir=d.tfds_dir)


def make_learner(config, cfg: models.QwenConfig, mesh=None, rules=None):
  """The config's learner with its own optimizers, as `build_run` makes it
  (`mar.tools.compiled_memory` compiles its update programs from shapes)."""
  return algorithms.family(config).make_learner(config, cfg, mesh, rules)


def make_runner(config, cfg: models.QwenConfig, tokenizer, verifier, mesh=None,
                timeline=None) -> RolloutRunner:
  """The config's rollout runner, sized by `mar.rollout.shape` (as the planners size it).

  One rollout call per step: PPO runs one episode per prompt, GRPO a group of G.
  """
  r = config.rollout
  return _runner(
      config, cfg, tokenizer, verifier, rows=rollout_shape.rollout_rows(config),
      max_attempts=methods.of(config).max_attempts(config),
      sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k),
      hint_feedback_len=r.hint_feedback_len, stop_at_box=r.stop_at_box, mesh=mesh,
      timeline=timeline, sampling_mesh=parallel.sampling_mesh(config),
      sampling_dtype=parallel.sampling_dtype(cfg))


def build_run(config, workdir: str) -> Run:
  if config.model.get("demo") and config.model.demo.enabled:
    from mar import demo

    config.model.path = demo.ensure_demo_model(config, workdir)
  config_utils.check_paths(config, ["model.path"])
  dtype = models.config.dtype_from_name(config.model.dtype)
  mesh, rules = parallel.mesh_from_config(config), parallel.rules_from_config(config)
  cfg, params = models.load_hf(config.model.path, dtype=jnp.float32, mesh=mesh, rules=rules)
  cfg = cfg.replace(dtype=dtype, remat=config.model.remat)
  tokenizer = Tokenizer.from_dir(config.model.path)
  train_data = load_train_data(config) if config.mode == "train" else []
  verifier = BatchVerifier(num_workers=config.verify.workers, timeout=config.verify.timeout)
  algorithm = algorithms.family(config)
  learner = algorithm.make_learner(config, cfg, mesh, rules)
  critic = algorithm.make_critic(config, cfg, params, learner)
  # keeps the params' sharding
  ref = jax.tree.map(jnp.copy, params) if methods.of(config).needs_reference(config) else None
  # opt.init(params) (the family's init_state) then builds the moments sharded like the params.
  sh, (actor_opt, critic_opt) = learner.shardings, algorithm.optimizers(learner)
  actor_opt = parallel.sharded_init(actor_opt, sh.actor_opt)
  if critic_opt is not None:
    critic_opt = parallel.sharded_init(critic_opt, sh.critic_opt)
  timeline = overlap.DeviceTimeline()
  runner = make_runner(config, cfg, tokenizer, verifier, mesh, timeline)
  train_data, skipped = drop_long_prompts(config, runner, train_data)
  logging.info("model %s: %d layers, hidden %d; %d training examples; mesh %s", cfg.model_type,
               cfg.num_layers, cfg.hidden_size, len(train_data), dict(mesh.shape))
  return Run(cfg, tokenizer, params, ref, critic, actor_opt, critic_opt, learner, runner,
             train_data, verifier, mesh=mesh, timeline=timeline, skipped_long_prompts=skipped)


def drop_long_prompts(config, runner: RolloutRunner, examples: list) -> tuple[list, int]:
  """Training examples whose prompts fit the largest prompt bucket, and how many did not."""
  training_prompts = algorithms.family(config).training_prompts
  keep = [ex for ex in examples
          if all(runner.fits(t) for t in training_prompts(config, ex.question))]
  skipped = len(examples) - len(keep)
  if skipped:
    logging.warning("%d of %d training examples have a prompt longer than rollout.prompt_len="
                    "%d tokens and are skipped (data/skipped_long_prompts)", skipped,
                    len(examples), runner.prompt_len)
  return keep, skipped
