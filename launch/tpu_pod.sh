#!/usr/bin/env bash
# mar on a Cloud TPU VM pod slice: the same `python -m mar.main` runs on every host of the
# slice; `--config.distributed=True` makes each call jax.distributed.initialize(), which on
# Cloud TPU finds the coordinator and the host count itself. Each host then feeds its own
# devices and the mesh in config.mesh spans all chips of the slice.
#
#   launch/tpu_pod.sh create              # create the slice (once)
#   launch/tpu_pod.sh setup               # copy this checkout + model + data, install deps
#   launch/tpu_pod.sh plan --model=qwen3_8b_base   # memory plan for this slice (local, no TPU)
#   launch/tpu_pod.sh run [--config.x=y]  # start training on every host (in tmux)
#   launch/tpu_pod.sh logs | stop | delete
#
# Environment:
#   TPU_NAME (mar-v5p-16)  ZONE (us-east5-a)  ACCELERATOR (v5p-16)  VERSION (v2-alpha-tpuv5)
#   PROJECT                gcloud project (default: gcloud's configured one)
#   CONFIG                 experiment config (configs/lte_qwen.py)
#   MODEL_GCS              gs:// folder of the HF checkpoint, copied to MODEL_DIR on every host
#   MODEL_DIR              local model folder on the hosts (/home/$USER/models/model)
#   DATA_GCS               gs:// JSONL of training data, copied to DATA_FILE on every host
#   DATA_FILE              local training data on the hosts (/home/$USER/data/train.jsonl)
#   WORKDIR                run directory; must be shared by all hosts (gs://bucket/run) so
#                          orbax can write one checkpoint from all of them
#   MESH                   "data,fsdp,tensor" (default "1,-1,1": FSDP over every chip)
#   MODEL_LOCAL            for `plan`: a local folder with the model's config.json (or pass
#                          --model=PRESET)
#   MEMORY_GIB             HBM per chip for `plan` (95 on v5p, 16 on v5e, 32 on v4)
set -euo pipefail

USER=${USER:-$(whoami)}
TPU_NAME=${TPU_NAME:-mar-v5p-16}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-16}
VERSION=${VERSION:-v2-alpha-tpuv5}
CONFIG=${CONFIG:-configs/lte_qwen.py}
MODEL_DIR=${MODEL_DIR:-/home/$USER/models/model}
DATA_FILE=${DATA_FILE:-/home/$USER/data/train.jsonl}
MESH=${MESH:-1,-1,1}
MEMORY_GIB=${MEMORY_GIB:-95}
REMOTE_DIR=mar
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi
IFS=, read -r DATA FSDP TENSOR <<< "$MESH"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
cd "$(dirname "$0")/.."

case "${1:-}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION"
    ;;
  setup)
    # The checkout (without caches), then deps with the TPU build of the pinned jax.
    tar czf /tmp/mar_src.tgz --exclude=.git --exclude='__pycache__' .
    tpu scp /tmp/mar_src.tgz "$TPU_NAME":/tmp/mar_src.tgz --worker=all
    JAX_VERSION=$(python -c "import jax; print(jax.__version__)")
    on_all "mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/mar_src.tgz -C ~/$REMOTE_DIR && \
      cd ~/$REMOTE_DIR && pip install -q -r requirements.txt -r requirements-extras.txt && \
      pip install -q 'jax[tpu]==$JAX_VERSION' \
        -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    # Model and data on every host's local disk (load_hf memory-maps local safetensors).
    if [[ -n "${MODEL_GCS:-}" ]]; then
      on_all "mkdir -p $MODEL_DIR && gcloud storage cp -r '$MODEL_GCS/*' $MODEL_DIR/"
    fi
    if [[ -n "${DATA_GCS:-}" ]]; then
      on_all "mkdir -p $(dirname "$DATA_FILE") && gcloud storage cp '$DATA_GCS' $DATA_FILE"
    fi
    # Every host must see the same number of chips, and jax must find them all.
    on_all "cd ~/$REMOTE_DIR && python -c 'import jax; jax.distributed.initialize(); \
      print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())'"
    ;;
  plan)
    CHIPS=$(python - "$ACCELERATOR" <<'EOF'
import sys
kind, n = sys.argv[1].rsplit("-", 1)
# v4/v5p names count TensorCores (2 per chip, one jax device per chip); v5e/v6e count chips.
print(int(n) // 2 if kind in ("v4", "v5p") else int(n))
EOF
)
    python -m mar.tools.plan_memory --config="$CONFIG" --config.model.path="${MODEL_LOCAL:-}" \
      --devices="$CHIPS" --device_memory_gib="$MEMORY_GIB" --config.mesh.data="$DATA" \
      --config.mesh.fsdp="$FSDP" --config.mesh.tensor="$TENSOR" "${@:2}"
    ;;
  run)
    : "${WORKDIR:?set WORKDIR to a gs:// path shared by all hosts}"
    CMD="cd ~/$REMOTE_DIR && HF_HUB_OFFLINE=1 python -m mar.main --config=$CONFIG \
      --config.distributed=True --config.model.path=$MODEL_DIR --config.data.train=$DATA_FILE \
      --config.mesh.data=$DATA --config.mesh.fsdp=$FSDP --config.mesh.tensor=$TENSOR \
      --workdir=$WORKDIR ${*:2} 2>&1 | tee ~/mar_run.log"
    # tmux keeps the run alive when the ssh session ends; all hosts start together.
    on_all "tmux kill-session -t mar 2>/dev/null; tmux new-session -d -s mar \"$CMD\""
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/mar_run.log"
    ;;
  stop)
    on_all "tmux kill-session -t mar 2>/dev/null || true"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,30p' "$0"
    exit 2
    ;;
esac
