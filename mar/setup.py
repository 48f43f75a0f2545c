"""Builds everything a run needs from its config: model, tokenizer, data, verifier, learners.

Nothing downloads: the model and tokenizer come from `config.model.path` (a local HF
folder), the data from `config.data.*` paths. The demo builds its own tiny model folder
first (`mar.demo`), so the same loading code runs.
"""

from __future__ import annotations

import dataclasses
import math
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
from mar.rollout.runner import RolloutRunner, RunnerSpec
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
  # train.offload_state resolved (`offload_state`): the training state waits in host memory
  # while the rollout runs.
  offload: bool = False
  # When the device was busy (the trainer's host critical-path share); fed by the runner.
  timeline: overlap.DeviceTimeline = dataclasses.field(default_factory=overlap.DeviceTimeline)

  def eval_runner(self, config, kind: str) -> RolloutRunner:
    """The evaluations' runners, cached: greedy multi-attempt ('attempts'), sampled
    multi-attempt ('sampled_attempts') and single-turn sampling ('passk')."""
    if kind not in self._eval_runners:
      e, attempts = config.eval, kind in ("attempts", "sampled_attempts")
      self._eval_runners[kind] = _runner(
          config, self.model_config, self.tokenizer, self.verifier, rows=e.batch_size,
          max_attempts=e.max_attempts if attempts else 1,
          sampling=(SamplingParams(temperature=0.0) if kind == "attempts" else
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
  spec = RunnerSpec(
      batch_size=rows, prompt_len=r.prompt_len, max_attempts=max_attempts,
      token_budget=r.token_budget, sampling=sampling, check_every=r.check_every,
      hint_feedback_len=hint_feedback_len, stop_at_box=stop_at_box, refill_rows=r.refill_rows,
      refill_wait=r.refill_wait, verify_every=r.verify_every)
  return RolloutRunner(cfg, tokenizer, verifier, spec, feedback_text=hints.hint_feedback_text,
                       **kw)


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
  resolve_auto_sizes(config, cfg, mesh, params)  # -1 sizes, before runner and learner
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


def update_activation_bytes(config, cfg: models.QwenConfig, mesh, micro_rows: int) -> int:
  """An update micro-batch's activations per device, from shapes: the layer inputs kept for
  the backward (all of every layer's without model.remat), one layer's intermediates and
  f32 attention scores, and the f32 logits of one log-prob chunk (with their gradient)."""
  rows = -(-micro_rows // parallel.batch_shards(mesh, parallel.rules_from_config(config)))
  seq = rollout_shape.rollout_shape(config).cache_len
  item = jnp.dtype(cfg.dtype).itemsize
  layer = 8 * cfg.hidden_size + 3 * cfg.intermediate_size  # one token's, in one layer
  kept = cfg.num_layers * (cfg.hidden_size if cfg.remat else layer + cfg.num_heads * seq)
  section = methods.of(config).hparams(config)
  chunk = min(int(section.get("logprob_chunk", 512)), seq)
  return (rows * seq * ((kept + layer) * item + cfg.num_heads * seq * 4)
          + 3 * rows * chunk * cfg.vocab_size * 4)


def auto_sizes(config, cfg: models.QwenConfig, mesh, params_bytes: int,
               bytes_limit: int | None) -> dict:
  """Values for the -1 sizes of `config` (rollout.batch_size, ppo/grpo.micro_batches).

  `params_bytes`: the f32 policy per device. Without a device memory figure (XLA:CPU): the
  step's episodes in one rollout program and one micro-batch (what 0 and 1 give). With one
  (TPU, GPU): the largest rows (`rollout_shape.row_candidates`) and fewest micro-batches
  whose estimate from shapes fits mesh.hbm_fraction of it beside the resident training
  state (f32 params, Adam moments, critic, reference): the rollout's weights and KV cache
  (`rollout_device_bytes`); the update's activations (`update_activation_bytes`) and f32
  gradient accumulator. XLA's temporaries are not in it: `python -m mar.tools.plan_memory
  --fit` sizes from the compiled programs.
  """
  method = methods.of(config)
  section, key = method.hparams(config), method.hparams_key
  out = {}
  budget = float(config.mesh.get("hbm_fraction", 0.9)) * bytes_limit if bytes_limit else None
  models_trained = 2 if method.is_ppo else 1  # PPO's critic: as large again
  kl = bool(section.kl_coef)
  state = params_bytes * (3 * models_trained + kl)
  if int(config.rollout.batch_size) < 0:
    data = parallel.sampling_mesh(config, devices=list(mesh.devices.flat)).shape["data"]
    cands = rollout_shape.row_candidates(config, data)
    fits = lambda r: budget is None or state + rollout_device_bytes(
        _with_value(config, "rollout", "batch_size", r), cfg, mesh) <= budget
    out["rollout.batch_size"] = next((r for r in cands if fits(r)), min(cands))
    config = _with_value(config, "rollout", "batch_size", out["rollout.batch_size"])
  if int(section.micro_batches) < 0:
    cands = rollout_shape.micro_candidates(config)
    per_mini = rollout_shape.step_episodes(config) // section.mini_batches
    fits = lambda m: budget is None or state + params_bytes + update_activation_bytes(
        config, cfg, mesh, per_mini // m) <= budget
    out[f"{key}.micro_batches"] = next((m for m in cands if fits(m)), cands[-1])
  return out


def _with_value(config, section: str, field: str, value):
  c = config.copy_and_resolve_references()
  c[section][field] = value
  return c


def _local_device(mesh):
  """This process's first device of `mesh` (one another host owns reports nothing here)."""
  return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def resolve_auto_sizes(config, cfg: models.QwenConfig, mesh, params) -> dict:
  """Sets the config's -1 sizes (`auto_sizes`) in place, before the runner and learner are
  built; returns them (logged)."""
  section = methods.of(config).hparams(config)
  if int(config.rollout.batch_size) >= 0 and int(section.micro_batches) >= 0:
    return {}
  device = _local_device(mesh)  # every host sees the same figures on its own devices
  stats = device.memory_stats() or {}
  sizes = auto_sizes(config, cfg, mesh, parallel.per_device_bytes(params, device),
                     stats.get("bytes_limit"))
  for k, v in sizes.items():
    section, field = k.split(".")
    config[section][field] = v
  if sizes:
    logging.info("sizes fitted at run time (-1): %s", sizes)
  return sizes


def offload_value(config):
  """train.offload_state as "auto", True or False (a flag override may give a string)."""
  v = config.train.get("offload_state", "auto")
  if isinstance(v, str):
    if v.lower() not in ("auto", "true", "false"):
      raise config_utils.ConfigError(f"config.train.offload_state={v!r}: expected auto, true "
                                     "or false")
    return "auto" if v.lower() == "auto" else v.lower() == "true"
  return bool(v)


def rollout_device_bytes(config, cfg: models.QwenConfig, mesh) -> int:
  """What the rollout adds on a device beside the training state, from shapes: the sampling
  copy of the weights and the KV cache of its rows (XLA's temporaries not counted)."""
  sm = parallel.sampling_mesh(config, devices=list(mesh.devices.flat))
  data, tensor = sm.shape["data"], sm.shape["tensor"]
  s = rollout_shape.rollout_shape(config)
  itemsize = jnp.dtype(parallel.sampling_dtype(cfg) or jnp.float32).itemsize
  weights = sum(math.prod(x) for x in jax.tree.leaves(
      models.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
  kv = 2 * cfg.num_layers * s.rows * cfg.num_kv_heads * s.cache_len * cfg.head_dim
  return (weights // tensor + kv // data // tensor) * itemsize


def offload_state(config, run: Run, state) -> bool:
  """Whether the training state goes to host memory during the rollout (train.offload_state).

  true: where the devices have pinned host memory (else a logged no-op). "auto": only when
  the devices report their memory (TPU, GPU) and the state resident per device plus the
  rollout's weights and KV cache (`rollout_device_bytes`) exceed mesh.hbm_fraction of it;
  `python -m mar.tools.plan_memory --fit` decides from the compiled programs instead and
  prints train.offload_state=true when they need it.
  """
  want = offload_value(config)
  if want is False:
    return False
  devices = list(run.mesh.devices.flat) if run.mesh is not None else jax.devices()
  if not parallel.has_host_memory(devices):
    if want is True:
      logging.warning("train.offload_state=true: %s devices have no pinned host memory; the "
                      "training state stays on the device", devices[0].platform)
    return False
  if want is True:
    return True
  device = _local_device(run.mesh) if run.mesh is not None else jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return False
  need = (parallel.per_device_bytes([state, run.ref], device)
          + rollout_device_bytes(config, run.model_config, run.mesh))
  budget = float(config.mesh.get("hbm_fraction", 0.9)) * stats["bytes_limit"]
  logging.info("train.offload_state=auto: state + rollout %.2f GiB per device vs %.2f GiB "
               "budget", need / 2**30, budget / 2**30)
  return need > budget


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
