#!/usr/bin/env bash
# mar on one multi-GPU host: a single process drives every GPU of the machine (SPMD over the
# mesh in config.mesh); no jax.distributed, no launcher.
#
#   launch/gpu_host.sh configs/lte_qwen.py /ckpt/Qwen3-8B-Base /runs/lte [more --config flags]
#
# Environment (all optional):
#   CUDA_VISIBLE_DEVICES  which GPUs form the mesh (default: all)
#   MESH                  "data,fsdp,tensor" sizes, -1 = the rest (default "1,-1,1": FSDP)
#   MEM_FRACTION          share of each GPU's memory XLA may take (default 0.95; XLA's own
#                         default of 0.75 leaves 20 GB of an 80 GB card unused)
#   TRAIN_DATA            overrides config.data.train
#   PLAN_ONLY=1           print the memory plan for this mesh and exit
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,16p' "$0"
  exit 2
fi
CONFIG=$1 MODEL=$2 WORKDIR=$3
shift 3
cd "$(dirname "$0")/.."

IFS=, read -r DATA FSDP TENSOR <<< "${MESH:-1,-1,1}"
NUM_GPUS=$(python -c "import jax; print(jax.local_device_count())")

export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95}
# Overlap collectives (FSDP all-gathers, gradient reduce-scatters) with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export HF_HUB_OFFLINE=1  # mar never downloads; fail fast if something tries

MESH_FLAGS=(--config.mesh.data="$DATA" --config.mesh.fsdp="$FSDP" --config.mesh.tensor="$TENSOR")
DATA_FLAGS=()
if [[ -n "${TRAIN_DATA:-}" ]]; then DATA_FLAGS=(--config.data.train="$TRAIN_DATA"); fi

# What XLA may allocate per GPU (after MEM_FRACTION): the budget the plan checks against.
GIB=$(python -c "import jax; s = jax.local_devices()[0].memory_stats() or {}; \
print(round(s.get('bytes_limit', 76 * 2**30) / 2**30, 1))")
python -m mar.tools.plan_memory --config="$CONFIG" --config.model.path="$MODEL" \
  --devices="$NUM_GPUS" --device_memory_gib="$GIB" "${MESH_FLAGS[@]}" "$@"
if [[ "${PLAN_ONLY:-0}" == 1 ]]; then exit 0; fi

exec python -m mar.main --config="$CONFIG" --config.model.path="$MODEL" \
  --workdir="$WORKDIR" "${MESH_FLAGS[@]}" "${DATA_FLAGS[@]}" "$@"
