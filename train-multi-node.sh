#!/usr/bin/env bash
# One node's share of a multi-node training job: mpirun.sh starts this once per node, e.g.
#   bash mpirun.sh hostfile train-multi-node.sh                       # the job written below
#   bash mpirun.sh hostfile train-multi-node.sh --ckpt_dir CKPT ...   # or your solver_train.py flags
# It reads its node rank and the node count from OpenMPI (OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE) and the
# master address from mpirun.sh (MASTER_ADDR / MASTER_PORT), then runs torchrun with NPROC_PER_NODE
# processes (default: one per GPU that torch sees, 1 without GPUs) and MAX_RESTARTS (torchrun --max_restarts,
# default 0: with K > 0 and --resume true every node's torchrun restarts its workers from the newest checkpoint).
# Global rank = node rank x NPROC_PER_NODE + local rank,
# so MP (the innermost dimension of the rank grid) stays inside a node when it divides NPROC_PER_NODE.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"

node_rank="${OMPI_COMM_WORLD_RANK:?not set: start this script with mpirun.sh HOSTFILE train-multi-node.sh}"
nnodes="${OMPI_COMM_WORLD_SIZE:?not set: start this script with mpirun.sh HOSTFILE train-multi-node.sh}"
master_addr="${MASTER_ADDR:?not set: start this script with mpirun.sh, which takes it from the hostfile}"
master_port="${MASTER_PORT:-29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  # the GPUs torch sees (CUDA_VISIBLE_DEVICES respected; nvidia-smi -L lists every GPU of the machine)
  gpus="$("${PYTHON:-python3}" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' \
    2>/dev/null || echo 0)"
  case "$gpus" in
    '' | *[!0-9]* | 0) NPROC_PER_NODE=1 ;;
    *) NPROC_PER_NODE="$gpus" ;;
  esac
fi

# torchrun's node rank 0 hosts the rendezvous at MASTER_ADDR, so it must run on that machine.
if [ "$node_rank" = 0 ] && command -v getent >/dev/null 2>&1 && hostname -I >/dev/null 2>&1; then
  master_ip="$(getent ahostsv4 "$master_addr" | awk 'NR == 1 { print $1 }')"
  case "$master_ip" in
    '' | 127.*) ;;
    *) if ! hostname -I | tr ' ' '\n' | grep -qxF "$master_ip"; then
         echo "warning: node rank 0 runs on $(hostname), but MASTER_ADDR=$master_addr ($master_ip) is not one of" \
           "its addresses: run mpirun.sh on the first host of the hostfile, or set MASTER_ADDR" >&2
       fi ;;
  esac
fi

if [ "$#" -eq 0 ]; then
  # The job. Edit these flags, or pass solver_train.py flags after the script name (they replace all of these).
  # Fetch the model on every node first: python3 tools/fetch_smollm2.py
  set -- --model_parallel_size 1 --sequence_parallel_size 1 \
    --ckpt_dir "${LLAMA_RLHF_CACHE:-$HOME/.cache/llama_rlhf}/SmolLM2-135M-Instruct" \
    --train_file "$repo/examples/data/sft_arithmetic.jsonl" --save_dir runs/multi_node --use_chat_template true \
    --max_seq_len 256 --max_batch_size 8 --epochs 1 --lr 1e-4 --warmup_steps 4 --lr_scheduler cosine
fi

# Preemption: mpirun forwards SIGUSR1 (SLURM sends it ahead of the time limit) to this script, and torchrun passes it
# on to its workers, which finish the step, save and exit; give them time to save before torchrun's SIGKILL.
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

cmd=("${PYTHON:-python3}" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank"
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$master_addr" --master_port "$master_port"
  --max_restarts "${MAX_RESTARTS:-0}"
  "$repo/solver_train.py" "$@")
echo "node $node_rank/$nnodes on $(hostname): ${cmd[*]}" >&2
exec "${cmd[@]}"
