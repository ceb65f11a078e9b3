#!/bin/bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch launch/slurm_train.sh configs/iam_llama3b_fsdp.yaml [key=value ...]
# For the deepspeed launcher instead, write a hostfile from $SLURM_JOB_NODELIST ("node slots=GPUS" per line) and run
#   deepspeed --hostfile hostfile launch/train.py --config configs/iam_llama3b_zero3.yaml
#
# Before the time limit SLURM sends USR1 to this script (--signal=B:USR1@120). The script then sends SIGTERM to the
# training ranks themselves, not to torchrun: every rank stops at the next step boundary, writes a checkpoint and
# exits 0, so torchrun and srun end with 0 too (a SIGTERM to torchrun itself makes it exit 1 with a traceback, however
# cleanly the ranks stopped). The script then requeues the job, which resumes with train.resume=auto.
#SBATCH --job-name=htr-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail
CONFIG=${1:?usage: sbatch launch/slurm_train.sh CONFIG [key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PYTHON=${PYTHON:-.venv/bin/python}

# GPUs of one node, from a SLURM GPU count: "8", a typed "a100:8" or "gpu:a100:8", a count with its indices
# "a100:4(IDX:0-3)", or a list of types "a100:2,v100:2" (summed). Prints nothing for a value it cannot read.
gpu_count() {
    local value total=0 entry count entries
    value=$(sed 's/([^)]*)//g' <<< "$1")
    [[ -n $value ]] || return 1
    IFS=, read -ra entries <<< "$value"
    for entry in "${entries[@]}"; do
        count=${entry##*:}
        [[ $count =~ ^[0-9]+$ ]] || return 1
        total=$((total + 10#$count))
    done
    echo "$total"
}

# Processes per node: $NPROC_PER_NODE if set, else the GPUs requested per node (--gpus-per-node), else the GPUs
# SLURM gave this node (--gres=gpu:N sets only that).
if [[ -n ${NPROC_PER_NODE:-} ]]; then
    count_var=NPROC_PER_NODE
elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    count_var=SLURM_GPUS_PER_NODE
elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    count_var=SLURM_GPUS_ON_NODE
else
    echo "slurm_train.sh: no GPU count: request GPUs with --gpus-per-node=N (or set NPROC_PER_NODE)" >&2
    exit 2
fi
if ! NPROC=$(gpu_count "${!count_var}") || [ "$NPROC" -lt 1 ]; then
    echo "slurm_train.sh: $count_var=${!count_var}: not a GPU count (expected N, TYPE:N or gpu:TYPE:N)" >&2
    exit 2
fi

stopping=0
stop_ranks() {
    stopping=1
    echo "slurm_train.sh: time limit near: sending SIGTERM to the training ranks" >&2
    # one task per node: the ranks are the children of that node's torchrun
    srun --overlap --ntasks-per-node=1 --nodes "$SLURM_NNODES" \
        bash -c 'for agent in $(pgrep -f "[t]orch.distributed.run .*launch/train.py"); do pkill -TERM -P "$agent"; done'
}
trap stop_ranks USR1

srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:${MASTER_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts 3 launch/train.py --config "$CONFIG" train.resume=auto "$@" &
job=$!
status=0
wait "$job" || status=$?
while kill -0 "$job" 2>/dev/null; do  # a trap ended the first wait early: wait for the ranks' checkpoint
    status=0
    wait "$job" || status=$?
done
if [ "$stopping" = 1 ]; then
    if [ "$status" = 0 ]; then
        echo "slurm_train.sh: checkpoint written; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "slurm_train.sh: the ranks did not stop cleanly (exit $status): not requeued" >&2
    fi
fi
exit "$status"
