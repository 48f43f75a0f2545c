"""ml_collections helpers shared by every config and by mar.main.

Every `configs/*.py` starts from `common_config()` and adds its own blocks; mar.main
locks the config (`config_flags.DEFINE_config_file(..., lock_config=True)`) so a
mistyped `--config.x.y=...` override fails instead of adding a new, unused field.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A config value that cannot run: `mar.main` reports it as one line and exits 1."""


def import_optional(name: str, feature: str):
    """Imports `name`, a package of requirements-extras.txt, for `feature` (what needs it).

    Missing, it raises a `ConfigError` that names the feature and the file to install.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"{feature} needs the optional package {name.split('.')[0]!r}, which is "
                          f"not installed ({e}): pip install -r requirements-extras.txt") from None


def cache_root() -> str:
    """`$MAR_CACHE`, else `$XDG_CACHE_HOME/mar`, else `~/.cache/mar`."""
    if os.environ.get("MAR_CACHE"):
        return os.environ["MAR_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mar")


# Programs that compile faster than this are not worth a cache entry (a read costs ~ms).
COMPILE_CACHE_MIN_SECONDS = 0.2


def enable_compilation_cache() -> str:
    """JAX's persistent compilation cache in `<cache_root>/xla`, unless one is already set.

    A second run of the same programs (the demo, replicate's arms, the tests) loads the compiled
    executables instead of compiling them again. `JAX_COMPILATION_CACHE_DIR` (or an earlier
    `jax_compilation_cache_dir`) wins. Returns the directory in use.
    """
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    return jax.config.jax_compilation_cache_dir


def common_config() -> ml_collections.ConfigDict:
    """The fields every mar config has, with defaults.

    mesh.{data,fsdp,tensor}: device counts per mesh axis; -1 means "all the devices the
    other axes leave" (at most one axis may be -1).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Share of a device's memory the fitted sizes may use (plan_memory --fit; -1 sizes).
    c.mesh.hbm_fraction = 0.9
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.metrics = ml_collections.ConfigDict()  # every step's scalars go to JSONL + TensorBoard
    return c


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The resolved config (field references evaluated) as plain Python containers."""
    return to_jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config), "config",
                       fallback=repr)


def save_config_json(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
    """Writes the resolved config to `<workdir>/config.json` (process 0 only); returns the path.

    Values JSON cannot hold (functions, dtypes, ...) are written as their repr.
    """
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if jax.process_index() != 0:
        return path
    os.makedirs(os.fspath(workdir), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    logging.info("Wrote %s", path)
    return path


def get_by_path(config: Any, key: str) -> Any:
    """`config.a.b.c` for key "a.b.c"; ValueError naming the first missing part."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"config has no field {where!r} (looking up {key!r})") from None
    return node


def check_paths(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Raises ConfigError naming every `config.<key>` whose path is unset or does not exist.

    Remote paths (with a scheme such as gs://) are not checked here.
    """
    problems = []
    for key in keys:
        value = get_by_path(config, key)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"config.{key} is not set; pass --config.{key}=PATH")
            continue
        path = os.fspath(value)
        if "://" in path:
            continue
        if not os.path.exists(os.path.expanduser(path)):
            problems.append(f"config.{key}: path {path!r} does not exist")
    if problems:
        raise ConfigError("; ".join(problems))


def split_comma_strings(config: ml_collections.ConfigDict) -> None:
    """Tuple fields given as `--config.x=a,b` arrive as ('a,b',): split them into ('a', 'b')."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            split_comma_strings(value)
        elif isinstance(value, tuple) and any(isinstance(v, str) and "," in v for v in value):
            config[key] = tuple(p.strip() for v in value
                                for p in (v.split(",") if isinstance(v, str) else [v]) if p != "")


def to_jsonable(value: Any, where: str = "value",
                fallback: Callable[[Any], Any] | None = None) -> Any:
    """`value` as plain JSON values: the one converter (metrics, checkpoint extras, configs, data).

    Containers recursively (keys as str), numpy / jax scalars and arrays as Python values,
    bytes as UTF-8 text, non-finite floats as None (JSON has no NaN). Any other object goes
    through `fallback` (configs use repr), else raises TypeError naming `where`.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, f"{where}.{k}", fallback) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, where, fallback) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        return to_jsonable(arr.tolist() if arr.ndim else arr.item(), where, fallback)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if fallback is not None:
        return fallback(value)
    raise TypeError(f"{where}: expected a number, string, array or container, "
                    f"found {type(value).__name__}")
