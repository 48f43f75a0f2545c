"""Run bookkeeping: MetricsWriter (JSONL + TensorBoard), read_jsonl, progress, timers, config helpers."""

import glob
import json
import os
import shutil
import struct
import tempfile
from unittest import mock

from absl import flags
from absl.testing import absltest
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
from tensorboardX.proto import event_pb2

from mar import config_utils
from mar import metrics


def read_tensorboard_scalars(workdir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the event files (TFRecord framing)."""
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


class MetricsWriterTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

    def test_rows_step_first_plain_json_nan_as_null(self):
        with metrics.MetricsWriter(self.workdir) as w:
            w.write(np.int64(1), {"loss": jnp.float32(0.5), "n": np.int32(3), "ok": np.bool_(True)})
            w.write(2, {"loss": float("nan"), "kl": np.float64(np.inf), "name": "x", "hist": np.arange(2)})
        with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], '{"step": 1, "loss": 0.5, "n": 3, "ok": true}')
        self.assertEqual(lines[1], '{"step": 2, "loss": null, "kl": null, "name": "x", "hist": [0, 1]}')
        rows = metrics.read_jsonl(os.path.join(self.workdir, "metrics.jsonl"))
        self.assertEqual([list(r)[0] for r in rows], ["step", "step"])
        self.assertIsInstance(rows[0]["n"], int)

    def test_tensorboard_scalars(self):
        with metrics.MetricsWriter(self.workdir) as w:
            w.write(1, {"loss": jnp.float32(0.25), "acc": 1, "name": "skip", "vec": np.zeros(3)})
            w.write(2, {"loss": np.float32(0.125)})
        scalars = read_tensorboard_scalars(self.workdir)
        self.assertCountEqual(scalars, [("loss", 1, 0.25), ("acc", 1, 1.0), ("loss", 2, 0.125)])

    def test_truncate_after_removes_later_rows_and_appends_continue(self):
        w = metrics.MetricsWriter(self.workdir)
        for s in range(1, 6):
            w.write(s, {"x": s})
        w.close()
        w = metrics.MetricsWriter(self.workdir)  # resumed run, checkpoint at step 3
        self.assertEqual(w.truncate_after(3), 2)
        w.write(4, {"x": 40})
        w.close()
        rows = metrics.read_jsonl(w.path)
        self.assertEqual([(r["step"], r["x"]) for r in rows], [(1, 1), (2, 2), (3, 3), (4, 40)])

    def test_partial_last_line_is_dropped_on_open(self):
        path = os.path.join(self.workdir, "metrics.jsonl")
        with open(path, "w") as f:
            f.write('{"step": 1, "x": 1}\n{"step": 2, "x"')
        self.assertEqual(metrics.read_jsonl(path), [{"step": 1, "x": 1}])
        with metrics.MetricsWriter(self.workdir) as w:
            w.write(2, {"x": 2})
        self.assertEqual(metrics.read_jsonl(path), [{"step": 1, "x": 1}, {"step": 2, "x": 2}])

    def test_disabled_writes_nothing(self):
        with metrics.MetricsWriter(self.workdir, enabled=False) as w:
            row = w.write(1, {"x": np.float32(2.0)})
            self.assertEqual(w.truncate_after(0), 0)
        self.assertEqual(row, {"step": 1, "x": 2.0})
        self.assertEqual(os.listdir(self.workdir), [])

    def test_only_process_zero_writes(self):
        with mock.patch.object(metrics.jax, "process_index", return_value=1):
            w = metrics.MetricsWriter(self.workdir)
        self.assertFalse(w.enabled)
        w.write(1, {"x": 1})
        w.close()
        self.assertEqual(os.listdir(self.workdir), [])

    def test_bad_values_name_the_key(self):
        with metrics.MetricsWriter(self.workdir) as w:
            with self.assertRaisesRegex(TypeError, "metric 'obj': expected a number"):
                w.write(1, {"obj": object()})
            with self.assertRaisesRegex(ValueError, "reserved"):
                w.write(1, {"step": 3})


class ReadJsonlTest(absltest.TestCase):

    def test_missing_file_is_empty_and_bad_line_names_file_and_line(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.assertEqual(metrics.read_jsonl(os.path.join(d, "none.jsonl")), [])
        path = os.path.join(d, "m.jsonl")
        with open(path, "w") as f:
            f.write('{"step": 1}\n\nnot json\n{"step": 3}\n')
        with self.assertRaisesRegex(ValueError, r"m\.jsonl:3: not a JSON object"):
            metrics.read_jsonl(path)
        with open(path, "w") as f:
            f.write("[1, 2]\n")
        with self.assertRaisesRegex(ValueError, r"m\.jsonl:1: expected a JSON object, found list"):
            metrics.read_jsonl(path)


class ProgressTest(absltest.TestCase):

    def test_enabled_only_on_tty_without_env(self):
        tty = mock.Mock(isatty=lambda: True)
        pipe = mock.Mock(isatty=lambda: False)
        with mock.patch.dict(os.environ, {"MAR_NO_PROGRESS": "0"}):
            self.assertTrue(metrics.progress_enabled(tty))
            self.assertFalse(metrics.progress_enabled(pipe))
        with mock.patch.dict(os.environ, {"MAR_NO_PROGRESS": "1"}):
            self.assertFalse(metrics.progress_enabled(tty))

    def test_disabled_logs_every_n_and_yields_all(self):
        with mock.patch.dict(os.environ, {"MAR_NO_PROGRESS": "1"}):
            with self.assertLogs(level="INFO") as logs:
                p = metrics.progress(range(10), desc="train", log_every=4, unit="step")
                p.set_postfix(loss=np.float32(0.5))
                items = list(p)
        self.assertEqual(items, list(range(10)))
        lines = [l for l in logs.output if "train:" in l]
        self.assertLen(lines, 3)  # at 4, 8 and the end (10/10)
        self.assertIn("train: 4/10 step (", lines[0])
        self.assertIn("step/s) loss=0.5", lines[0])
        self.assertIn("train: 10/10 step", lines[2])

    def test_total_with_update_and_tqdm_bar(self):
        p = metrics.progress(5, desc="eval", enabled=True)
        self.assertIsNotNone(p._bar)
        for _ in range(5):
            p.update()
        p.close()
        self.assertEqual(p.n, 5)
        with self.assertRaises(TypeError):
            iter(metrics.progress(3, enabled=False)).__next__()


class TimerTest(absltest.TestCase):

    def test_timed_accumulates_and_timer_metrics(self):
        clock = iter([0.0, 1.5, 10.0, 12.0, 20.0, 20.25])
        with mock.patch.object(metrics.time, "perf_counter", lambda: next(clock)):
            times = {}
            with metrics.timed("sample", times):
                pass
            with metrics.timed("sample", times):
                pass
            timer = metrics.Timer()
            with timer("verify"):
                pass
        self.assertEqual(times, {"sample": 3.5})
        self.assertEqual(timer.metrics(), {"time/verify": 0.25, "time/total": 0.25})

    def test_timer_as_stopwatch(self):
        clock = iter([5.0, 7.0])
        with mock.patch.object(metrics.time, "perf_counter", lambda: next(clock)):
            with metrics.Timer() as t:
                pass
        self.assertEqual(t.elapsed, 2.0)


def parse_config_flags(argv: list[str]):
    """What mar.main does: a locked config flag with command-line overrides."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config_utils.common_config(), flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


class ConfigUtilsTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

    def test_common_fields_and_types(self):
        c = config_utils.common_config()
        self.assertEqual(
            config_utils.config_to_dict(c),
            {"seed": 0, "train": {"num_steps": 100},
             "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "hbm_fraction": 0.9},
             "checkpoint": {"every_steps": 50, "keep": 3, "async_save": True}, "metrics": {}},
        )

    def test_overrides_and_locked_config_rejects_unknown_keys(self):
        c = parse_config_flags(
            ["prog", "--config.seed=3", "--config.mesh.fsdp=2", "--config.checkpoint.async_save=false"])
        self.assertEqual((c.seed, c.mesh.fsdp, c.checkpoint.async_save), (3, 2, False))
        with self.assertRaisesRegex(AttributeError, "bogus"):
            parse_config_flags(["prog", "--config.train.bogus=1"])
        c = config_utils.common_config()
        c.lock()
        with self.assertRaisesRegex(KeyError, "cannot be added since the config is locked"):
            c.update_from_flattened_dict({"train.bogus": 1})
        with self.assertRaisesRegex(TypeError, "seed"):
            c.seed = "x"

    def test_save_config_json_resolves_references(self):
        c = config_utils.common_config()
        c.checkpoint.every_steps = c.train.get_ref("num_steps")
        c.train.num_steps = 9  # the reference follows
        path = config_utils.save_config_json(c, self.workdir)
        self.assertEqual(path, os.path.join(self.workdir, "config.json"))
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual(saved["checkpoint"]["every_steps"], 9)
        self.assertEqual(saved["mesh"], {"data": -1, "fsdp": 1, "tensor": 1, "hbm_fraction": 0.9})

    def test_check_paths_names_key_and_path(self):
        c = config_utils.common_config()
        c.model = {"path": os.path.join(self.workdir, "no_such_model"), "tokenizer": self.workdir}
        c.data = {"train": "", "remote": "gs://bucket/x.jsonl"}
        config_utils.check_paths(c, ["model.tokenizer", "data.remote"])
        with self.assertRaises(ValueError) as e:
            config_utils.check_paths(c, ["model.path", "model.tokenizer", "data.train"])
        msg = str(e.exception)
        missing = os.path.join(self.workdir, "no_such_model")
        self.assertIn(f"config.model.path: path '{missing}' does not exist", msg)
        self.assertIn("config.data.train is not set; pass --config.data.train=PATH", msg)
        self.assertNotIn("tokenizer", msg)
        with self.assertRaisesRegex(ValueError, "config has no field 'model.weights'"):
            config_utils.check_paths(c, ["model.weights"])


if __name__ == "__main__":
    absltest.main()
