"""Per-device memory of a run before launching it: does this config fit this mesh?

  python -m mar.tools.plan_memory --config=configs/lte_qwen.py --model=qwen3_8b_base \\
      --devices=8 --config.mesh.fsdp=8 --config.mesh.data=1 --device_memory_gib=80
  python -m mar.tools.plan_memory --config=configs/multi_attempt_qwen.py \\
      --model=qwen2_5_math_1_5b --compiled --devices=8 --json   # or --topology=v5p:2x2x2
  python -m mar.tools.plan_memory --config=configs/lte_qwen.py --model=qwen3_8b_base \
      --topology=v5p:2x2x2 --hbm_gib=74 --fit --compiled --json   # sizes that fit (fit.py)

The memory model (exact state bytes, modelled program peaks, the compiled report) is
`mar.tools.memory_plan`; `--fit` is `mar.tools.fit`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from mar.models.config import PRESETS, QwenConfig
from mar.tools import fit
from mar.tools import memory_plan as mp
from mar.tools.memory_plan import GiB

# ----- command line -------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_MODEL = flags.DEFINE_string("model", None, f"Preset instead of config.model.path: {sorted(PRESETS)}")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices in the mesh (default: jax.device_count()).")
_MEMORY = flags.DEFINE_float("device_memory_gib", 80.0, "Memory of one device, GiB.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
_COMPILED = flags.DEFINE_bool(
    "compiled", False, "Also compile the rollout and update programs (no weights) and report "
    "XLA's own per-device figures: memory analysis, KV bytes, collectives in the decode loop.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compiled: compile for this TPU topology ahead of time (e.g. "
    "v5p:2x2x2; needs libtpu, jax[tpu]) instead of --devices simulated CPU devices.")
_FIT = flags.DEFINE_bool(
    "fit", False, "Choose rollout.batch_size and the update's micro-batches that fit (a "
    "config's sizes are upper bounds, -1: the whole step), compile every program at them "
    "(rollout, scoring, updates) and print them as --config.* overrides with a roofline "
    "(mar.tools.fit); exit 1 naming the program and its bytes when nothing fits.")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", None, "With --fit: usable GiB per device, in place of mesh.hbm_fraction x the "
    "chip's memory (e.g. 74 for an 80 GB GPU, with a TPU topology of as many chips).")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "With --compiled: write the optimized HLO "
                                "of each program here (rollout.txt, update*.txt).")


def _use_simulated_devices(n: int | None) -> None:
  """Asks XLA:CPU for n devices (before the backend starts; a no-op once it has)."""
  if n:
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  model = mp.model_config(config, _MODEL.value)
  if (_COMPILED.value or _FIT.value) and not _TOPOLOGY.value:
    _use_simulated_devices(_DEVICES.value)
  devices = _DEVICES.value or jax.device_count()
  if _TOPOLOGY.value:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    devices = len(topologies.get_topology_desc(_TOPOLOGY.value, "tpu").devices)
  name = _MODEL.value or config.model.path or "demo model"
  title = f"{flags.FLAGS['config'].config_filename} ({config.method}), {name}"
  if _FIT.value:
    _print_fit(config, model, devices)
    return
  pl = mp.plan(config, model, devices, _MEMORY.value, title=title)
  if not _COMPILED.value:
    print(json.dumps(pl.as_dict(), indent=1) if _JSON.value else mp.format_plan(pl))
    return
  report = mp.compiled_report(config, model, _DEVICES.value, _TOPOLOGY.value, _DUMP_HLO.value)
  report["plan"]["training_plan"] = pl.as_dict()
  report["plan_over_compiled"].update(mp.training_plan_over_compiled(pl, report))
  if _JSON.value:
    print(json.dumps(report, indent=1))
    return
  print(mp.format_plan(pl))
  r, p = report["rollout"], report["plan"]
  print(f"\ncompiled rollout on {report['target']}, sampling mesh {report['sampling_mesh']}:")
  for k in ("arguments_bytes_per_device", "temporaries_bytes_per_device",
            "peak_bytes_per_device", "kv_bytes_per_device"):
    print(f"  {k}: {r[k] / GiB:.2f} GiB")
  print(f"  planned peak {p['peak_bytes_per_device'] / GiB:.2f} GiB, KV "
        f"{p['kv_bytes_per_device'] / GiB:.2f} GiB")
  print(f"  decode loop: {r['decode_loop_collectives']} collectives, "
        f"{r['decode_loop_collective_bytes']} bytes per token step {r['decode_loop_collective_ops']}")
  for name, u in report.get("update", {}).items():
    print(f"compiled {name} on training mesh {report['training_mesh']}: peak "
          f"{u['peak_bytes_per_device'] / GiB:.2f} GiB, planned "
          f"{p['update'][name]['peak_bytes_per_device'] / GiB:.2f} GiB")
  print("planned / compiled: " + ", ".join(
      f"{k} {v:.3f}" for k, v in report["plan_over_compiled"].items()))


def _print_fit(config, model: QwenConfig, num_devices: int) -> None:
  """--fit: the fitted sizes as overrides, every program's bytes, the roofline; exit 1 when
  nothing fits."""
  if _TOPOLOGY.value:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    devices = list(topologies.get_topology_desc(_TOPOLOGY.value, "tpu").devices)
  else:
    _use_simulated_devices(_DEVICES.value)
    devices = jax.devices()[:num_devices]
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    report = fit.fit_report(config, model, devices, _TOPOLOGY.value, _HBM_GIB.value, log=log)
  except fit.NoFit as e:
    if _JSON.value:
      print(json.dumps({"fit": None, "error": str(e), **e.report}, indent=1))
    print(f"does not fit: {e}", file=sys.stderr)
    sys.exit(1)
  if _JSON.value:
    print(json.dumps({"fit": report}, indent=1))
    return
  print(f"fits {report['target']} in {report['hbm_bytes_per_device'] / GiB:.2f} GiB per device "
        f"with {report['flags']}")
  for name, nbytes in report["programs"].items():
    print(f"  {name}: {nbytes / GiB:.2f} GiB per device")
  if "roofline" in report:
    rf = report["roofline"]
    print(f"  roofline: {rf['step_s']:.1f} s per step, {rf['tokens_per_s_per_chip']:.0f} "
          "tokens/s per chip")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
