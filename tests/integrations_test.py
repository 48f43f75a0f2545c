"""A 2-step demo run, then the tools people use after training: HF export, W&B.

The export is loaded back with `transformers.AutoModelForCausalLM` + `AutoTokenizer`; its
logits must equal mar's forward on the checkpoint's trained params within the HF parity
test's tolerance, from a one-device run and from an fsdp=8 run (8 simulated devices).
The W&B run is offline (WANDB_MODE=offline); its `.wandb` file is read back record by record.
"""

import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
import testutil
import torch
import transformers

from mar import checkpoint
from mar import export
from mar import metrics
from mar import train
from mar.data.tokenizer import Tokenizer
from mar.models import hf_io
from mar.models import model as M
from mar.models.config import QwenConfig
from mar.tools import export_hf
from testutil import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # tests/hf_io_test.py's parity tolerance
_RUNS: dict = {}


def trained_run(mesh: str) -> str:
  """A 2-step PPO run of the tiny demo model (once per mesh), exporting RUN/hf at the end."""
  if mesh not in _RUNS:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    c = tiny_config("ppo")
    c.train.num_steps = 2
    c.export.update(dict(at_end=True, dtype="float32"))
    if mesh == "fsdp8":
      c.mesh.update(dict(data=1, fsdp=8, tensor=1))
    else:
      c.metrics.wandb = True
    workdir = tempfile.mkdtemp()
    train.train(c, workdir)
    _RUNS[mesh] = workdir
  return _RUNS[mesh]


def trained_policy(workdir: str):
  """The policy of the run's last checkpoint, restored by the trainer's own Checkpointer."""
  with checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir)) as ckpt:
    step, state, _ = ckpt.restore()
  return step, jax.device_get(state["policy"])


def hf_logits(folder: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def mar_logits(model_dir: str, params, tokens: np.ndarray) -> np.ndarray:
  cfg = QwenConfig.from_hf_dir(model_dir)
  return np.asarray(M.forward(cfg, params, jnp.asarray(tokens)))


class ExportTest(absltest.TestCase):

  def check_folder(self, folder: str, params):
    """transformers loads `folder` (model + tokenizer) and its logits equal mar's."""
    model_dir = tiny_config().model.path
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n\\boxed{7}"
    ids = Tokenizer.from_dir(model_dir).encode(text)
    self.assertEqual(tok(text, add_special_tokens=False)["input_ids"], ids)
    tokens = np.array([ids[:16], ids[-16:]])
    diff = np.abs(hf_logits(folder, tokens) - mar_logits(model_dir, params, tokens)).max()
    self.assertLess(diff, TOL)
    with open(os.path.join(folder, export.GENERATION_CONFIG)) as f:
      self.assertIn("eos_token_id", json.load(f))

  def test_one_device_run_exports_at_end_and_by_command(self):
    workdir = trained_run("single")
    step, params = trained_policy(workdir)
    self.assertEqual(step, 2)
    # The policy moved in training (else parity with the initial weights would prove little).
    _, initial = hf_io.load_hf(tiny_config().model.path)
    self.assertGreater(np.abs(params["embed"] - np.asarray(initial["embed"])).max(), 0)
    self.check_folder(os.path.join(workdir, "hf"), params)

    out = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "mar.tools.export_hf", f"--workdir={workdir}",
                    f"--out={out}", "--dtype=float32", "--max_shard_size=200000"],
                   cwd=REPO, env=testutil.subprocess_env(), check=True, capture_output=True,
                   timeout=300)
    with open(os.path.join(out, hf_io.INDEX_FILE)) as f:
      shards = set(json.load(f)["weight_map"].values())
    self.assertGreater(len(shards), 1)
    self.assertIn("tokenizer.json", os.listdir(out))
    self.check_folder(out, params)

  def test_default_dtype_is_bfloat16_of_the_trained_params(self):
    workdir = trained_run("single")
    _, params = trained_policy(workdir)
    reads = []
    read = checkpoint.read_state_leaf

    def recorded(directory, step, keys, dtype=None):
      reads.append(keys)
      return read(directory, step, keys, dtype)

    with mock.patch.object(checkpoint, "read_state_leaf", recorded):
      out = export_hf.export_checkpoint(workdir, tempfile.mkdtemp())
    # One array at a time, each policy leaf once; the critic and optimizer are never read.
    self.assertEqual(sorted(reads), sorted(("policy",) + tuple(p.key for p in path)
                                           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]))
    tensors = load_file(os.path.join(out, hf_io.SINGLE_FILE))
    self.assertEqual(tensors["model.embed_tokens.weight"].dtype, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                  params["embed"].astype(ml_dtypes.bfloat16))
    with open(os.path.join(out, "config.json")) as f:
      self.assertEqual(json.load(f)["torch_dtype"], "bfloat16")
    self.assertNotIn("value_head", json.dumps(sorted(tensors)))  # the critic is not exported

  @pytest.mark.slow
  def test_fsdp8_run_exports_at_end_and_from_its_checkpoint(self):
    workdir = trained_run("fsdp8")
    _, params = trained_policy(workdir)
    self.check_folder(os.path.join(workdir, "hf"), params)  # from sharded params
    out = export_hf.export_checkpoint(workdir, tempfile.mkdtemp(), dtype="float32")
    self.check_folder(out, params)  # from the checkpoint a mesh wrote

  def test_missing_step_names_the_steps_found(self):
    workdir = trained_run("single")
    with self.assertRaisesRegex(FileNotFoundError, r"step 7; found \[1, 2\]"):
      export_hf.export_checkpoint(workdir, tempfile.mkdtemp(), step=7)


# ----- W&B --------------------------------------------------------------------------------


def wandb_records(path: str):
  """The protobuf records of a `.wandb` file (LevelDB log blocks after a 7-byte header)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:8]
  pos, pending, block = 7, b"", 32768
  while pos + 7 <= len(data):
    left = block - pos % block
    length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
    if left < 7 or kind == 0:  # block trailer / zero padding
      pos += left
      continue
    if pos + 7 + length > len(data):  # a record still being written
      return
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 2):  # full, first
      pending = chunk
    else:  # middle, last
      pending += chunk
    if kind in (1, 4):
      yield wandb_internal_pb2.Record.FromString(pending)


def finished_records(path: str, timeout: float = 60.0) -> list:
  """The records of a finished run: W&B's writer process may still be flushing its file."""
  deadline = time.time() + timeout
  while True:
    records = list(wandb_records(path))
    if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
      return records
    time.sleep(0.2)


class WandbTest(absltest.TestCase):

  def test_offline_run_holds_the_step_metrics_and_config(self):
    workdir = trained_run("single")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    files = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    self.assertLen(files, 1)
    history, config = {}, {}
    for rec in finished_records(files[0]):
      kind = rec.WhichOneof("record_type")
      if kind == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
        history.setdefault(items["_step"], {}).update(items)
      elif kind == "run":
        config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    self.assertEqual(sorted(history), [1, 2])
    for row in rows:
      logged = history[row["step"]]
      for key in ("loss", "reward_mean", "success_at_attempt/1"):
        self.assertAlmostEqual(logged[key], row[key], places=5, msg=key)
    self.assertEqual(config["method"], "ppo")
    self.assertEqual(config["train"]["num_steps"], 2)

  def test_eval_rows_and_plots_go_as_a_table_and_images(self):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from mar.wandb_sink import WandbSink  # pylint: disable=g-import-not-at-top

    os.environ.setdefault("WANDB_MODE", "offline")
    workdir = tempfile.mkdtemp()
    sink = WandbSink(workdir, {"method": "ppo"}, project="mar", read_rows=metrics.read_jsonl)
    sink.log(1, {"loss": 0.5})
    with open(os.path.join(workdir, "eval.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "benchmark": "math500", "k": 1, "accuracy": 0.25}) + "\n")
    os.makedirs(os.path.join(workdir, "plots"))
    Image.new("RGB", (4, 4)).save(os.path.join(workdir, "plots", "attempts.png"))
    sink.log(2, {"loss": 0.25})
    sink.close()
    (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    logged = {}
    for rec in finished_records(path):
      if rec.WhichOneof("record_type") == "history":
        logged.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item})
    self.assertIn("eval/table/_type", logged, sorted(logged))
    self.assertEqual(logged["eval/table/_type"], "table-file")
    self.assertEqual(logged["eval/table/nrows"], 1)
    self.assertEqual(logged["plots/attempts/_type"], "image-file")
    (table,) = glob.glob(os.path.join(os.path.dirname(path), "files", "media", "table", "eval",
                                      "*.table.json"))
    with open(table) as f:
      t = json.load(f)
    self.assertEqual(dict(zip(t["columns"], t["data"][0]))["accuracy"], 0.25)


if __name__ == "__main__":
  absltest.main()
