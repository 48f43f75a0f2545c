"""Entry point: python -m mar.main --config=configs/X.py[:variant] --workdir=DIR.

The config is locked, so a typo in `--config.foo=...` is an error, not a silent no-op.
`config.mode` picks training (PPO, GRPO, LTE: `config.method`) or evaluation only.
"""

import logging as py_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mar import config_utils


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except config_utils.ConfigError as e:
    # Like absl's flag errors: one line naming the key, no traceback, a non-zero exit.
    sys.exit(f"mar.main: config error: {e}")


def run(config, workdir: str) -> None:
  """Trains or evaluates as `config.mode` says."""
  config_utils.split_comma_strings(config)
  config_utils.enable_compilation_cache()  # a second run loads its programs, compiles none
  if config.get("distributed"):
    jax.distributed.initialize()
  logging.info("config:\n%s", config)
  if config.mode == "train":
    from mar import train

    train.train(config, workdir)
  elif config.mode == "eval":
    from mar import eval_only

    eval_only.evaluate_checkpoint(config, workdir)
  else:
    raise config_utils.ConfigError(f"config.mode: expected 'train' or 'eval', found {config.mode!r}")


if __name__ == "__main__":
  app.run(main)
