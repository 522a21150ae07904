#!/bin/bash
# One node of a training job: torchrun for this node's ranks, plus the stop/requeue logic.
#   srun ... bash launch/run_node.sh <config> [key=value ...]
# Needs: OUT_DIR, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, REPO, PYTHON (default python);
# Slurm's SLURM_JOB_ID, SLURM_JOB_NUM_NODES, SLURM_NODEID.
#
# Slurm's pre-termination signal (--signal=USR1@<grace>) or the SIGTERM of
# `scontrol requeue` / preemption creates $OUT_DIR/STOP; the trainer checkpoints
# at the end of its current step and exits. If the run is not FINISHED, node 0
# requeues the job; the requeued (or resubmitted, or chained) job resumes from the
# newest complete checkpoint in $OUT_DIR.
set -uo pipefail
cd "${REPO:-.}"  # relative paths in configs are relative to the repository
config=$1; shift
STOP_FILE="$OUT_DIR/STOP"
export STOP_FILE
PYTHON=${PYTHON:-python}
node=${SLURM_NODEID:-0}
if [ "$node" = 0 ]; then mkdir -p "$OUT_DIR"; rm -f "$STOP_FILE"; fi

on_signal() {
  echo "[launch] node $node: termination signal, asking the trainer to checkpoint and stop"
  touch "$STOP_FILE"
}
trap on_signal USR1 TERM

"$PYTHON" -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
  -m megatron_lpreg.train --config "$config" "train.out_dir=$OUT_DIR" "train.stop_file=$STOP_FILE" "$@" &
pid=$!
# a trapped signal interrupts `wait`: keep waiting until torchrun has really exited
while true; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break
done

if [ -f "$OUT_DIR/FINISHED" ]; then
  echo "[launch] node $node: run finished"
  exit 0
fi
if [ -f "$STOP_FILE" ]; then
  if [ "$node" = 0 ]; then
    echo "[launch] stopped before the end: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
echo "[launch] node $node: trainer exited with $rc before the end"
exit "$rc"
