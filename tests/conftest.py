"""Test-wide settings: offline, CPU, 8 simulated devices, a shared compilation cache.

The whole suite runs with 8 simulated CPU devices so that the sharded tests can run in
process (XLA reads the device count once); single-device code simply uses device 0.
Subprocesses that run `mar.main` get a clean XLA_FLAGS (see `testutil.subprocess_env`).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MAR_NO_PROGRESS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# JAX's persistent compilation cache under $MAR_CACHE (as mar.main uses it): a second run of
# the suite, and the trainer's subprocesses, load compiled executables instead of compiling.
from mar import config_utils  # noqa: E402  (imports jax: after the environment above)

config_utils.enable_compilation_cache()
