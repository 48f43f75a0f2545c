"""Async, crash-tolerant checkpoints of the training state (orbax CheckpointManager).

A run directory holds `<workdir>/checkpoints/<step>/` folders, each with two items:
`state` (a pytree of arrays: params, optimizer state, PRNG key data ...) and `extra`
(a small JSON dict: data iterator position, counters, anything host-side).

Restoring picks the latest *valid* step. A step that was cut short or damaged (kill -9 mid-write,
files truncated, flipped or deleted, commit marker missing) is logged with one absl warning,
renamed aside to `<step>.invalid-<unix time>` so later saves of that step number do not
collide with it, and the previous step is used. Unfinished orbax tmp folders are never
read (orbax skips them; they are deleted when a Checkpointer opens the directory).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from mar import config_utils

_STATE = "state"
_EXTRA = "extra"
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"

PyTree = Any


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """The checkpoints folder of a run directory."""
    return os.path.join(os.fspath(workdir), "checkpoints")


class Checkpointer:
    """Saves every `every_steps` steps (async), keeps the last `keep`, restores the latest valid one.

    Args:
      directory: the checkpoints folder itself (use `checkpoint_dir(workdir)` or
        `Checkpointer.from_config`). Local path or any path etils.epath understands.
      keep: how many most recent steps to keep on disk.
      every_steps: `save` is a no-op unless `step % every_steps == 0` or `force=True`.
      async_save: write in a background thread; `save` returns once the arrays are
        copied to host memory, so donated device buffers may be reused right after.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        every_steps: int = 1,
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, found {keep}")
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps must be >= 1, found {every_steps}")
        self.directory = epath.Path(directory)
        self.keep = keep
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            should_save_fn=lambda step, _last: step % every_steps == 0,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _EXTRA: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    @classmethod
    def from_config(cls, workdir: str | os.PathLike, config: Any) -> "Checkpointer":
        """From a `config.checkpoint` block (every_steps, keep, async_save)."""
        return cls(
            checkpoint_dir(workdir),
            keep=int(config.keep),
            every_steps=int(config.every_steps),
            async_save=bool(config.async_save),
        )

    # ---------------------------------------------------------------- saving

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write a checkpoint."""
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: PyTree,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts writing `state` and `extra` as checkpoint `step`; returns whether it did.

        `extra` must be JSON-able (numpy scalars and arrays are converted); it is checked
        here, before the background write, so a bad value fails at the call site. Skips
        (returns False) when the interval says so, or when `step` is already on disk.
        """
        step = int(step)
        extra_json = config_utils.to_jsonable(dict(extra or {}), "checkpoint extra")
        if not force and not self._manager.should_save(step):
            return False
        if step in self._manager.all_steps():
            logging.info("Checkpoint step %d already exists in %s; not saving.", step, self.directory)
            return False
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra_json)}
            ),
            force=force,
        )
        if saved:
            logging.info("Checkpoint step %d started in %s.", step, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Blocks until any background save has been committed (and old steps removed)."""
        self._manager.wait_until_finished()

    # ------------------------------------------------------------- restoring

    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (validity is checked only on restore)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None for an empty directory."""
        return self._manager.latest_step()

    def restore(
        self, target_state_like: PyTree | None = None, step: int | None = None
    ) -> tuple[int, PyTree, dict] | None:
        """Returns `(step, state, extra)` of the latest valid checkpoint, or None if there is none.

        With `target_state_like` (a pytree of arrays or `jax.ShapeDtypeStruct`s carrying a
        sharding) each array is restored with the target's shape, dtype and sharding, so
        a state sharded over a mesh comes back sharded over it, whatever mesh saved it.
        Numpy leaves in the target come back as numpy arrays. Without a target, arrays are
        restored as saved (on the saved devices, if they exist).

        A target whose tree paths or shapes differ from the checkpoint raises ValueError
        (a config mismatch is not a corrupt checkpoint). Corrupt or partial steps are
        skipped with a warning; if every step is unreadable, raises RuntimeError.
        With `step`, restores exactly that step, without fallback.
        """
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; found {steps}")
            return self._restore_step(step, target_state_like)
        if not steps:
            return None
        _silence_closed_loop_callbacks()
        bad: list[int] = []
        errors: list[str] = []
        for candidate in reversed(steps):
            try:
                result = self._restore_step(candidate, target_state_like)
            except _TargetMismatchError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                bad.append(candidate)
                errors.append(f"{self._step_path(candidate)}: {type(e).__name__}: {_short(str(e))}")
                continue
            if bad:
                self._set_aside(bad, errors, restored=candidate)
            return result
        raise RuntimeError(
            f"no readable checkpoint in {self.directory}; tried steps {sorted(bad, reverse=True)}:\n"
            + "\n".join(errors)
        )

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- internal

    def _step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _restore_step(self, step: int, target: PyTree | None) -> tuple[int, PyTree, dict]:
        path = self._step_path(step)
        missing = [
            name
            for name in (_COMMIT_MARKER, _STEP_METADATA, _STATE, _EXTRA)
            if not (path / name).exists()
        ]
        if missing:
            raise FileNotFoundError(f"{path} lacks {missing}")
        abstract = None
        if target is not None:
            abstract = jax.tree.map(_abstract_leaf, target)
            stored = self._manager.item_metadata(step)[_STATE]
            if stored is None or not jax.tree.leaves(stored):
                raise FileNotFoundError(f"{path / _STATE} has no readable array metadata")
            _check_target_matches(stored, abstract, path / _STATE)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract), _EXTRA: ocp.args.JsonRestore()}
            ),
        )
        extra = restored[_EXTRA]
        if extra is None:
            raise FileNotFoundError(f"{path / _EXTRA} could not be read")
        logging.info("Restored checkpoint %s.", path)
        return step, restored[_STATE], dict(extra)

    def _set_aside(self, steps: list[int], errors: list[str], restored: int) -> None:
        """Renames unreadable steps so they are neither restored nor collide with new saves.

        One warning per unreadable step says what was wrong, where it went and which step
        the run resumes from.
        """
        if jax.process_index() == 0:
            stamp = int(time.time())
            for step, error in zip(steps, errors):
                dst = self.directory / f"{step}.invalid-{stamp}"
                self._step_path(step).rename(dst)
                logging.warning("Checkpoint %s is corrupt or incomplete; moved it to %s and resumed "
                                "from step %d. (%s)", self._step_path(step), dst, restored,
                                error.split(": ", 1)[1])
        ocp.multihost.sync_global_processes("mar_checkpoint_set_aside")
        self._manager.reload()


def _silence_closed_loop_callbacks() -> None:
    """Drops "Event loop is closed" errors that tensorstore posts after a failed read.

    While a read of a corrupt step fails, tensorstore's threads may still complete futures
    into orbax's already closed asyncio loop; Python reports each as an unraisable traceback
    (seen: six of them, 118 lines, when a demo run resumed), which reads as a crash. The
    restore's own outcome is logged or raised by `restore`, so exactly that error is
    dropped; every other unraisable exception still reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_mar_closed_loop_filter", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._mar_closed_loop_filter = True  # pylint: disable=protected-access
    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_errors)


def _drop_unretrieved_read_errors(record: std_logging.LogRecord) -> bool:
    """Drops asyncio's "Task exception was never retrieved" for tensorstore's DATA_LOSS reads.

    The same failed restore as above: sibling reads of the corrupt step fail after the first
    failure was raised, nobody awaits them, and asyncio logs each with its traceback. Only
    that case is dropped (a DATA_LOSS error in an unretrieved task).
    """
    exc = record.exc_info[1] if record.exc_info else None
    unretrieved = record.getMessage().startswith("Task exception was never retrieved")
    return not (unretrieved and "DATA_LOSS" in str(exc))


# ------------------------------------------------------ reading one array at a time


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of a checkpoints folder whose write finished, ascending; opens no manager.

    Readers outside the trainer (the HF exporter) use this instead of a `Checkpointer`,
    whose manager would clean up the tmp folder of a save still in flight.
    """
    root = epath.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no checkpoints folder")
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / _COMMIT_MARKER).exists()
    )


def state_metadata(directory: str | os.PathLike, step: int) -> PyTree:
    """The stored `state` tree of `step` as `jax.ShapeDtypeStruct`s (nothing is read)."""
    path = epath.Path(directory) / str(step) / _STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint item")
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def read_state_leaf(
    directory: str | os.PathLike, step: int, keys: tuple[str, ...], dtype: Any = None
) -> np.ndarray:
    """One array of `step`'s state (`keys` is its path, e.g. ("policy", "embed")) on the host.

    Only that array is read (orbax partial restore), whatever mesh wrote it, cast to
    `dtype` while reading when given.
    """
    path = epath.Path(directory) / str(step) / _STATE
    node = state_metadata(directory, step)
    for k in keys:
        node = node[k]
    target, restore_args = node, ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    for k in reversed(keys):
        target, restore_args = {k: target}, {k: restore_args}
    out = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
    for k in keys:
        out = out[k]
    return np.asarray(out)


class _TargetMismatchError(ValueError):
    """The restore target does not describe the stored state (a config error)."""


def _abstract_leaf(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x  # ShapeDtypeStruct, numpy array or scalar: orbax handles them as given.


def _path_names(path: tuple) -> tuple[str, ...]:
    """Tree path as plain names, so a namedtuple field and the dict key it is stored as agree."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def _stored_shape(x: Any) -> tuple[int, ...]:
    """Shape as written to disk: typed PRNG keys are stored as their uint32 key data."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(np.shape(x))


def _check_target_matches(stored: PyTree, target: PyTree, where: epath.Path) -> None:
    want = {_path_names(p): _stored_shape(x) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {
        _path_names(p): tuple(m.shape)
        for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
        if hasattr(m, "shape")
    }
    problems = []
    for name in sorted(set(want) - set(have))[:5]:
        problems.append(f"{'/'.join(name)}: expected in checkpoint, not found")
    for name in sorted(set(have) - set(want))[:5]:
        problems.append(f"{'/'.join(name)}: in checkpoint, not in target")
    for name in sorted(set(want) & set(have)):
        if tuple(want[name]) != have[name]:
            problems.append(f"{'/'.join(name)}: expected shape {tuple(want[name])}, found {have[name]}")
    if problems:
        raise _TargetMismatchError(
            f"restore target does not match checkpoint {where}:\n  " + "\n  ".join(problems[:10])
        )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."
