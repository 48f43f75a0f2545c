"""Weights & Biases as a third metrics sink (`config.metrics.wandb`), beside JSONL and TensorBoard.

`MetricsWriter` hands it the scalars it sends TensorBoard, at the same steps. The run gets
the resolved config, and the run directory's evaluation rows (`eval.jsonl`) and plots
(`plots/*.png`) as a W&B table and images whenever they changed. `WANDB_MODE=offline`
writes everything under `<workdir>/wandb/` for a later `wandb sync`. The run id is kept in
`<workdir>/wandb_run_id`, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable, Mapping
import uuid

from absl import logging

from mar import config_utils

RUN_ID_FILE = "wandb_run_id"
EVAL_FILE = "eval.jsonl"  # mar.evaluation.report writes it; read here as plain JSONL
EVAL_TABLE = "eval/table"


def _run_id(workdir: str) -> str:
  """The run's W&B id: made once, then read back on resume."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  run_id = uuid.uuid4().hex[:12]
  with open(path, "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  return run_id


class WandbSink:
  """One W&B run per run directory; `log` per step, `close` at the end."""

  def __init__(self, workdir: str, config_dict: Mapping[str, Any], project: str,
               read_rows: Callable[[str], list[dict]], entity: str = ""):
    """`read_rows(path)` reads eval.jsonl (MetricsWriter passes its reader, which skips a
    line cut short by a crash; the sink stays below metrics so imports run one way)."""
    wandb = config_utils.import_optional("wandb", "config.metrics.wandb")

    self._wandb = wandb
    self.workdir = workdir
    self._read_rows = read_rows
    self._run = wandb.init(project=project, entity=entity or None,
                           name=os.path.basename(os.path.normpath(workdir)),
                           id=_run_id(workdir), resume="allow", dir=workdir,
                           config=dict(config_dict))
    self._seen: dict[str, float] = {}  # file -> mtime already logged
    self._last_step = 0

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """Scalars of `step`, plus the eval table and plots if they changed since last time."""
    self._last_step = step
    self._run.log({**scalars, **self._changed_media()}, step=step)

  def close(self) -> None:
    media = self._changed_media()
    if media:
      self._run.log(media, step=self._last_step)
    self._run.finish()

  def _changed(self, path: str) -> bool:
    mtime = os.path.getmtime(path)
    if self._seen.get(path) == mtime:
      return False
    self._seen[path] = mtime
    return True

  def _changed_media(self) -> dict:
    out = {}
    eval_path = os.path.join(self.workdir, EVAL_FILE)
    if os.path.isfile(eval_path) and self._changed(eval_path):
      table = self._eval_table(eval_path)
      if table is not None:
        out[EVAL_TABLE] = table
    for png in sorted(glob.glob(os.path.join(self.workdir, "plots", "*.png"))):
      if self._changed(png):
        name = os.path.splitext(os.path.basename(png))[0]
        out[f"plots/{name}"] = self._wandb.Image(png)
    return out

  def _eval_table(self, path: str):
    rows = self._read_rows(path)
    if not rows:
      return None
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    try:
      return self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    except Exception as e:  # pylint: disable=broad-except  (mixed-type columns: keep training)
      logging.warning("W&B: could not build the table of %s: %s", path, e)
      return None
