#!/bin/bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch launch/slurm_train.sh configs/iam_llama3b_fsdp.yaml [key=value ...]
# For the deepspeed launcher instead, write a hostfile from $SLURM_JOB_NODELIST ("node slots=GPUS" per line) and run
#   deepspeed --hostfile hostfile launch/train.py --config configs/iam_llama3b_zero3.yaml
#SBATCH --job-name=htr-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120          # SIGTERM 2 minutes before the end: every rank checkpoints and exits 0
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG [key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 .venv/bin/python -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc_per_node "${SLURM_GPUS_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" --max-restarts 3 \
    launch/train.py --config "$CONFIG" train.resume=auto "$@"
