"""Test-wide settings: offline, CPU, 8 simulated devices, a shared compilation cache.

The whole suite runs with 8 simulated CPU devices so that the sharded tests can run in
process (XLA reads the device count once); single-device code simply uses device 0.
Subprocesses that run `mar.main` get a clean XLA_FLAGS (see `testutil.subprocess_env`).
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MAR_NO_PROGRESS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Subprocess runs of the trainer compile the same programs again: share compiled executables.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mar_test_jax_cache"))
