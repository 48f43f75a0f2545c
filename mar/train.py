"""The training loop: the step's examples -> the method's iteration -> metrics, checkpoint, eval.

Reads top to bottom: `train()` builds the run (`setup.build_run`), restores the last
checkpoint, then per step draws the step's examples from the data order (`data_indices`)
and hands them to the algorithm family's `iteration` (`mar.algorithms`: rollout, rewards,
advantages, LTE's hints, the update). Each step is deterministic given (seed, step, data
position): the data order, the attempt counts and the PRNG keys are all derived from them,
and the position (how many examples of the data order earlier steps used: a fixed count per
step, except with DAPO's dynamic sampling) is checkpointed, so a run resumed from a checkpoint reproduces the metrics of an
uninterrupted one.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np

from mar import checkpoint as ckpt_lib
from mar import config_utils
from mar import evaluate
from mar import export
from mar import metrics as metrics_lib
from mar import parallel
from mar import plots
from mar import setup
from mar.algorithms import family


def batch_indices(config, num_examples: int, step: int) -> np.ndarray:
  """Example indices of a step of prompts_per_step examples (`data_indices`)."""
  b = config.rollout.prompts_per_step
  return data_indices(config, num_examples, step * b, b)


def data_indices(config, num_examples: int, position: int, count: int) -> np.ndarray:
  """Indices of `count` examples from `position` of the data order: epoch-wise permutations
  of the data seeded by config.seed."""
  flat = np.arange(position, position + count)
  epochs = flat // num_examples
  out = np.empty(count, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([config.seed, int(e)]).permutation(num_examples)
    sel = epochs == e
    out[sel] = perm[flat[sel] % num_examples]
  return out


# ----- the loop ----------------------------------------------------------------------------


def _should_eval(config, done: int) -> bool:
  periodic = config.eval.every_steps and done % config.eval.every_steps == 0
  return bool(periodic or (done == config.train.num_steps and config.eval.at_end))


def _draw_plots(workdir: str) -> None:
  if parallel.is_main_process():
    plots.plot_all(workdir)


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last step's metrics."""
  os.makedirs(workdir, exist_ok=True)
  config_utils.save_config_json(config, workdir)
  run = setup.build_run(config, workdir)
  algorithm = family(config)
  state = algorithm.init_state(config, run)
  run.offload = setup.offload_state(config, run, state)
  ckpt = ckpt_lib.Checkpointer.from_config(workdir, config.checkpoint)
  writer = metrics_lib.MetricsWriter.from_config(workdir, config)
  start = position = 0
  restored = ckpt.restore(state)
  if restored is not None:
    start, state, extra = restored
    position = int(extra.get("data_position", start * config.rollout.prompts_per_step))
    logging.info("resumed from checkpoint at step %d (data position %d)", start, position)
    writer.truncate_after(start)
  elif config.eval.at_start:
    start_eval = evaluate.scalars(evaluate.run_eval(config, run, state["policy"], workdir, step=0))
    if start_eval:
      writer.write(0, start_eval)
    _draw_plots(workdir)
  last: dict = {}
  bar = metrics_lib.progress(config.train.num_steps, desc=f"train[{config.method}]",
                             initial=start)
  for step in range(start, config.train.num_steps):
    idx = data_indices(config, len(run.train_data), position, algorithm.examples_per_step(config))
    state, last = algorithm.iteration(config, run, state, [run.train_data[i] for i in idx], step)
    position += int(last.get("dapo/groups_consumed", len(idx)))
    last["data/skipped_long_prompts"] = float(run.skipped_long_prompts)
    last.update({f"rollout/reshard_{k}": v for k, v in run.runner.reshard_stats.items()})
    last = parallel.mean_over_hosts(last)
    done = step + 1
    evaluated = _should_eval(config, done)
    if evaluated:  # before the row is written: it carries eval/* scalars
      last.update(evaluate.scalars(
          evaluate.run_eval(config, run, state["policy"], workdir, step=done)))
    writer.write(done, last)
    if evaluated and done < config.train.num_steps:  # the last: drawn below
      _draw_plots(workdir)
    bar.update(1)
    bar.set_postfix(loss=last.get("loss"), reward=last.get("reward_mean"))
    ckpt.save(done, state, extra={"step": done, "data_position": position},
              force=done == config.train.num_steps)
  bar.close()
  ckpt.wait()
  ckpt.close()
  _draw_plots(workdir)
  writer.close()  # after the plots: W&B gets the final ones
  export.export_at_end(config, workdir, state["policy"])
  run.close()
  return last
