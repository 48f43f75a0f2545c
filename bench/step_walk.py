"""How far a reader walks to follow one training step: the mar files a step's Python calls
cross, in order.

  python bench/step_walk.py            # PPO (configs/demo.py) and LTE (configs/demo.py:lte)

Runs step 0 of each method on the cached demo model (compiles), then traces step 1 with
`sys.setprofile`. A reader reads each function once, when the step first calls it: the walk
is the files of the mar functions in first-call order, consecutive repeats collapsed (a
loop calling the same two functions per item is read once, not per item). Prints per
method: `files` (distinct files entered), `moves` (changes of file along the walk),
`returns` (moves into a file entered before), `functions` (distinct mar functions called)
and `path` (the files in first-entry order). Host-side Python only: what runs inside a
jitted program is traced once, at compile time, in step 0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

MAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mar")


def _iteration(config):
  """The method's iteration (the algorithm registry; before it, train's two functions)."""
  try:
    from mar import algorithms  # pylint: disable=g-import-not-at-top
    fam = algorithms.family(config)
    return fam.iteration, fam.init_state, fam.examples_per_step(config)
  except ImportError:
    from mar import train  # pylint: disable=g-import-not-at-top
    it = train.ppo_iteration if config.method == "ppo" else train.group_iteration
    return it, train.init_state, config.rollout.prompts_per_step


def walk(variant: str | None) -> dict:
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from mar import demo, setup, train  # pylint: disable=g-import-not-at-top

  config = demo_config.get_config(variant)
  work = tempfile.mkdtemp()
  config.model.path = demo.ensure_demo_model(config, work)
  config.model.demo.enabled = False
  config.verify.workers = 1
  run = setup.build_run(config, work)
  iteration, init_state, per_step = _iteration(config)
  state = init_state(config, run)
  seq: list[str] = []
  seen: set = set()

  def profile(frame, event, arg):
    del arg
    code = frame.f_code
    if event == "call" and code.co_filename.startswith(MAR) and code not in seen:
      seen.add(code)
      if not seq or seq[-1] != code.co_filename:
        seq.append(code.co_filename)

  for step in range(2):
    idx = train.data_indices(config, len(run.train_data), step * per_step, per_step)
    examples = [run.train_data[i] for i in idx]
    if step == 1:
      sys.setprofile(profile)
    state, _ = iteration(config, run, state, examples, step)
    sys.setprofile(None)
  run.close()
  first = list(dict.fromkeys(os.path.relpath(f, os.path.dirname(MAR)) for f in seq))
  returns = sum(1 for i, f in enumerate(seq) if f in seq[:i])
  return {"files": len(first), "moves": len(seq) - 1, "returns": returns,
          "functions": len(seen), "path": first}


def main():
  sys.path.insert(0, os.path.dirname(MAR))
  out = {"ppo": walk(None), "lte": walk("lte")}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
