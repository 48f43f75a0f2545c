"""Prints multi-attempt episodes as dialogues with their masks marked.

  python -m mar.tools.show_rollout --config=configs/demo.py --workdir=/tmp/mar_demo --num=4

Uses the config's model (the demo builds its own), the training data and the rollout
settings; `--attempts` fixes N for every episode.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from mar import setup
from mar.algorithms import ppo
from mar.rollout.render import render_episode

def show(config, workdir: str, num: int, attempts: int = 0, seed: int = 0) -> list[str]:
  """Runs one rollout batch and returns each episode rendered as text."""
  run = setup.build_run(config, workdir)
  examples = run.train_data[:num]
  n = attempts or config.rollout.max_attempts
  prompt_fn = ppo.prompt_function(config)
  prompts = [prompt_fn(ex.question, n) for ex in examples]
  episodes = run.runner.run(run.params, prompts, [ex.answer for ex in examples], [n] * len(prompts),
                            jax.random.PRNGKey(seed))
  texts = [render_episode(run.tokenizer, episodes, b) for b in range(len(examples))]
  run.close()
  return texts


def _define_flags():
  """Flags exist only when run as a program, so importing `show` defines none."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", "/tmp/mar_show_rollout", "Where a demo model is built.")
  flags.DEFINE_integer("num", 4, "Episodes to show.")
  flags.DEFINE_integer("attempts", 0, "N per episode (0: config.rollout.max_attempts).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  f = flags.FLAGS
  for i, text in enumerate(show(f.config, f.workdir, f.num, f.attempts, f.seed)):
    print(f"==================== episode {i} ====================\n{text}\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
