"""Checkpointer: round trips, retention, corrupt/partial steps, async saves, sharded restore."""

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mar import checkpoint

# After a failed read of a corrupt step, tensorstore may post a callback to orbax's already
# closed event loop, which Python reports as "unraisable". Harmless: the tests check the
# fallback restore that follows.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed: int = 0) -> dict:
    """A nested state with the dtypes a trainer checkpoints."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
            "emb": jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16),
        },
        "opt": {"count": jnp.int32(seed), "mu": [jnp.zeros(3), jnp.full((2, 2), float(seed))]},
        "rng": jax.random.key_data(key),  # uint32 [2]
        "host": np.arange(5, dtype=np.int32) + seed,
    }


def assert_trees_equal(test, got, want):
    test.assertEqual(jax.tree.structure(got), jax.tree.structure(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        test.assertEqual(np.asarray(g).dtype, np.asarray(w).dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def step_data_files(step_dir: str) -> list[str]:
    """The files holding array bytes and the OCDBT index of a step's state."""
    return sorted(glob.glob(os.path.join(step_dir, "state", "d", "*")))


class CheckpointTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        workdir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        self.dir = checkpoint.checkpoint_dir(workdir)

    def save_steps(self, steps, keep=5, async_save=False):
        ck = checkpoint.Checkpointer(self.dir, keep=keep, async_save=async_save)
        for s in steps:
            self.assertTrue(ck.save(s, make_state(s), {"data_pos": s * 10, "rng": [s, 7]}))
        ck.wait()
        return ck

    def test_round_trip_without_target(self):
        with self.save_steps([3]) as ck:
            step, state, extra = ck.restore()
        self.assertEqual(step, 3)
        assert_trees_equal(self, state, make_state(3))
        self.assertIsInstance(state["host"], np.ndarray)
        self.assertEqual(extra, {"data_pos": 30, "rng": [3, 7]})

    def test_round_trip_with_target_keeps_dtypes_and_structure(self):
        with self.save_steps([2, 4]) as ck:
            step, state, extra = ck.restore(make_state(0))
        self.assertEqual(step, 4)
        assert_trees_equal(self, state, make_state(4))
        self.assertEqual(state["params"]["emb"].dtype, jnp.bfloat16)
        self.assertEqual(extra["data_pos"], 40)

    def test_typed_prng_key_round_trip(self):
        key = jax.random.key(5)
        with checkpoint.Checkpointer(self.dir, async_save=False) as ck:
            ck.save(1, {"key": key})
            _, state, _ = ck.restore({"key": jax.random.key(0)})
        np.testing.assert_array_equal(jax.random.key_data(state["key"]), jax.random.key_data(key))

    def test_empty_directory_restores_none(self):
        with checkpoint.Checkpointer(self.dir) as ck:
            self.assertIsNone(ck.latest_step())
            self.assertIsNone(ck.restore())

    def test_keep_retains_last_k(self):
        with self.save_steps([1, 2, 3, 4, 5], keep=2) as ck:
            self.assertEqual(ck.all_steps(), [4, 5])
        self.assertEqual(sorted(os.listdir(self.dir)), ["4", "5"])

    def test_every_steps_and_force(self):
        with checkpoint.Checkpointer(self.dir, every_steps=3, async_save=False) as ck:
            saved = [s for s in range(1, 8) if ck.save(s, {"x": np.float32(s)})]
            self.assertEqual(saved, [3, 6])
            self.assertTrue(ck.save(7, {"x": np.float32(7)}, force=True))
            self.assertFalse(ck.save(7, {"x": np.float32(7)}, force=True))  # already there
            self.assertEqual(ck.all_steps(), [3, 6, 7])

    @parameterized.named_parameters(
        ("delete_data_file", "delete"),
        ("truncate_data_file", "truncate"),
        ("delete_commit_marker", "marker"),
        ("delete_state_metadata", "metadata"),
        ("delete_extra_item", "extra"),
    )
    def test_corrupt_latest_falls_back_to_previous(self, how):
        self.save_steps([10, 20]).close()
        latest = os.path.join(self.dir, "20")
        files = step_data_files(latest)
        self.assertNotEmpty(files)
        if how == "delete":
            os.remove(files[0])
        elif how == "truncate":
            for f in files:
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
        elif how == "marker":
            os.remove(os.path.join(latest, "commit_success.txt"))
        elif how == "metadata":
            os.remove(os.path.join(latest, "state", "_METADATA"))
        elif how == "extra":
            shutil.rmtree(os.path.join(latest, "extra"))
        with checkpoint.Checkpointer(self.dir, keep=5, async_save=False) as ck:
            with self.assertLogs(level="WARNING") as logs:
                step, state, extra = ck.restore(make_state(0))
            self.assertEqual(step, 10)
            assert_trees_equal(self, state, make_state(10))
            self.assertEqual(extra["data_pos"], 100)
            self.assertTrue(any(latest in line for line in logs.output), logs.output)
            # The bad step is set aside: training can resume and save step 20 again.
            self.assertEqual(ck.all_steps(), [10])
            self.assertTrue(ck.save(20, make_state(21), {"data_pos": 210}))
            ck.wait()
            step, state, _ = ck.restore(make_state(0))
        self.assertEqual(step, 20)
        assert_trees_equal(self, state, make_state(21))
        self.assertLen(glob.glob(os.path.join(self.dir, "20.invalid-*")), 1)

    def test_all_corrupt_raises(self):
        self.save_steps([1]).close()
        for f in step_data_files(os.path.join(self.dir, "1")):
            os.remove(f)
        with checkpoint.Checkpointer(self.dir) as ck:
            with self.assertRaisesRegex(RuntimeError, "no readable checkpoint"):
                ck.restore()

    def test_unfinished_tmp_directory_is_ignored(self):
        self.save_steps([5]).close()
        # What kill -9 during the save of step 6 leaves: a tmp folder with partial content.
        tmp = os.path.join(self.dir, "6.orbax-checkpoint-tmp-1700000000000000")
        shutil.copytree(os.path.join(self.dir, "5"), tmp)
        os.remove(os.path.join(tmp, "commit_success.txt"))
        with checkpoint.Checkpointer(self.dir) as ck:
            self.assertEqual(ck.latest_step(), 5)
            step, state, _ = ck.restore(make_state(0))
        self.assertEqual(step, 5)
        assert_trees_equal(self, state, make_state(5))

    def test_async_save_then_wait(self):
        ck = checkpoint.Checkpointer(self.dir, keep=3, async_save=True)
        state = make_state(1)
        self.assertTrue(ck.save(1, state, {"data_pos": np.int64(3)}))
        ck.wait()
        self.assertTrue(os.path.exists(os.path.join(self.dir, "1", "commit_success.txt")))
        step, got, extra = ck.restore(state)
        ck.close()
        self.assertEqual((step, extra), (1, {"data_pos": 3}))
        assert_trees_equal(self, got, state)

    def test_target_shape_mismatch_is_a_clear_error_not_a_fallback(self):
        self.save_steps([1, 2]).close()
        target = make_state(0)
        target["params"]["w"] = jnp.zeros((8, 17))
        with checkpoint.Checkpointer(self.dir) as ck:
            with self.assertRaisesRegex(ValueError, r"params/w: expected shape \(8, 17\), found \(8, 16\)"):
                ck.restore(target)
            self.assertEqual(ck.all_steps(), [1, 2])  # nothing set aside

    def test_extra_must_be_json(self):
        with checkpoint.Checkpointer(self.dir) as ck:
            with self.assertRaisesRegex(TypeError, r"checkpoint extra\.bad: expected"):
                ck.save(1, {"x": np.zeros(2)}, {"bad": object()})

    def test_sharded_restore_on_simulated_devices(self):
        """Saved on a 4-way data mesh, restored onto a 2x2 mesh: values equal, target sharding kept."""
        script = textwrap.dedent(
            """
            import sys
            import jax, jax.numpy as jnp, numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            from mar import checkpoint
            assert jax.device_count() == 4, jax.devices()
            x = np.arange(64, dtype=np.float32).reshape(8, 8)
            m1 = Mesh(np.array(jax.devices()), ("data",))
            state = {"w": jax.device_put(x, NamedSharding(m1, P("data", None)))}
            ck = checkpoint.Checkpointer(sys.argv[1], async_save=True)
            ck.save(1, state, {})
            ck.wait()
            m2 = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
            sh = NamedSharding(m2, P("tensor", "fsdp"))
            step, got, _ = ck.restore({"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sh)})
            ck.close()
            assert step == 1
            assert got["w"].sharding == sh, got["w"].sharding
            np.testing.assert_array_equal(np.asarray(got["w"]), x)
            print("SHARDED_OK")
            """
        )
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-c", script, self.dir], env=env, capture_output=True, text=True, timeout=300
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertIn("SHARDED_OK", proc.stdout)


class ReadErrorLogFilterTest(absltest.TestCase):
    """The corrupt-step fallback drops asyncio's report of unretrieved DATA_LOSS reads only."""

    def _record(self, message, exc):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                                 (type(exc), exc, None))

    def test_drops_unretrieved_data_loss_and_keeps_the_rest(self):
        keep = checkpoint._drop_unretrieved_read_errors  # pylint: disable=protected-access
        lost = ValueError('DATA_LOSS: Error opening "zarr" driver')
        self.assertFalse(keep(self._record("Task exception was never retrieved\nfuture: <Task>",
                                           lost)))
        self.assertTrue(keep(self._record("Task exception was never retrieved",
                                          ValueError("something else"))))
        self.assertTrue(keep(self._record("Unclosed client session", lost)))


if __name__ == "__main__":
    absltest.main()
