"""Evaluation-only mode: score `config.model.path`, or a checkpoint of the run.

`config.eval.checkpoint_step`: -1 evaluates the latest checkpoint if the workdir has one
(else the model folder); a step >= 0 must exist and is evaluated exactly.
"""

from __future__ import annotations

import os

from absl import logging

from mar import checkpoint as ckpt_lib
from mar import config_utils
from mar import evaluate
from mar import plots
from mar import setup
from mar.algorithms import family


def evaluate_checkpoint(config, workdir: str) -> list[dict]:
  os.makedirs(workdir, exist_ok=True)
  config_utils.save_config_json(config, workdir)
  run = setup.build_run(config, workdir)
  params, step = run.params, 0
  ckpt_path = ckpt_lib.checkpoint_dir(workdir)
  wanted = config.eval.checkpoint_step
  if wanted >= 0 and not os.path.isdir(ckpt_path):
    raise config_utils.ConfigError(f"config.eval.checkpoint_step={wanted}: {workdir} has no "
                            f"checkpoints ({ckpt_path} does not exist)")
  if os.path.isdir(ckpt_path):
    ckpt = ckpt_lib.Checkpointer(ckpt_path, async_save=False)
    # The target must be the whole training state: restore checks every leaf against it.
    target = family(config).init_state(config, run)
    if wanted >= 0:
      restored = ckpt.restore(target, step=wanted)
    else:
      restored = ckpt.restore(target) if ckpt.latest_step() is not None else None
    if restored is not None:
      step, state, _ = restored
      params = state["policy"]
      logging.info("evaluating checkpoint step %d", step)
    ckpt.close()
  rows = evaluate.run_eval(config, run, params, workdir, step=step)
  plots.plot_all(workdir)
  run.close()
  return rows
