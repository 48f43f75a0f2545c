"""Helpers shared by the test suites."""
import os

# The benchmark and training data live outside the repo (see ../shared/data/SOURCE.md);
# tests find it through MAR_DATA_DIR, defaulting to the checkout's sibling folder.
DATA_DIR = os.environ.get(
    "MAR_DATA_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"),
)


def subprocess_env(**extra) -> dict:
  """Environment for a `python -m mar.main` subprocess: one CPU device, no progress bars."""
  env = dict(os.environ, MAR_NO_PROGRESS="1", JAX_PLATFORMS="cpu", **extra)
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
  return env
