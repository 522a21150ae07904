#!/bin/bash
# One node of a training job: torchrun for this node's ranks, plus the stop/requeue logic.
#   srun ... bash launch/run_node.sh <config> [key=value ...]
# Needs: OUT_DIR, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, REPO, PYTHON (default python),
# MAX_RESTARTS (default 3); Slurm's SLURM_JOB_ID, SLURM_JOB_NUM_NODES, SLURM_NODEID.
#
# Slurm's pre-termination signal (--signal=USR1@<grace>) or the SIGTERM of
# `scontrol requeue` / preemption creates $OUT_DIR/STOP; the trainer checkpoints
# at the end of its current step and exits. If the run is not FINISHED, node 0
# requeues the job after a USR1 or a clean stop (after a bare SIGTERM Slurm requeues
# or ends the job itself); the requeued (or resubmitted, or chained) job resumes from
# the newest complete checkpoint in $OUT_DIR.
#
# Failures: torchrun restarts every rank of the job (all nodes) when one fails, hangs
# (the trainer's watchdog, train.hang_timeout_s) or is killed, at most $MAX_RESTARTS
# times; each start resumes from the newest verified checkpoint and is logged in
# $OUT_DIR/resume_log.jsonl with its cause. After the last one this node prints one
# line (the count and the last error) and the job fails.
set -uo pipefail
cd "${REPO:-.}"  # relative paths in configs are relative to the repository
config=$1; shift
STOP_FILE="$OUT_DIR/STOP"
export STOP_FILE
PYTHON=${PYTHON:-python}
MAX_RESTARTS=${MAX_RESTARTS:-3}
# what the ranks run: the trainer, or the pre-run diagnostic (python -m launch ... --diagnose)
MODULE=${LPREG_MODULE:-megatron_lpreg.train}
node=${SLURM_NODEID:-0}
if [ "$node" = 0 ]; then mkdir -p "$OUT_DIR"; rm -f "$STOP_FILE"; fi

usr1=0
term=0
on_signal() {
  echo "[launch] node $node: $1, asking the trainer to checkpoint and stop"
  if [ "$1" = USR1 ]; then usr1=1; else term=1; fi
  touch "$STOP_FILE"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# A restart must not read the previous round's addresses: torchrun's shared rendezvous
# store keeps them, and restarted ranks then connect to dead ones ("Connection refused");
# without sharing, each round's rank 0 hosts a fresh store
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun ignores USR1 (its default action would end torchrun and, with it, the ranks);
# the ranks catch it themselves, and see the stop file
( trap '' USR1
  exec "$PYTHON" -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m "$MODULE" --config "$config" "train.out_dir=$OUT_DIR" "train.stop_file=$STOP_FILE" "$@" ) &
pid=$!
# a trapped signal interrupts `wait`: keep waiting until torchrun has really exited
while true; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break
done

if [ "$MODULE" != megatron_lpreg.train ] && [ "$rc" = 0 ]; then
  echo "[launch] node $node: $MODULE finished"
  exit 0
fi
if [ -f "$OUT_DIR/FINISHED" ]; then
  echo "[launch] node $node: run finished"
  exit 0
fi
if [ -f "$STOP_FILE" ] && { [ "$rc" = 0 ] || [ "$usr1" = 1 ]; }; then
  if [ "$node" = 0 ]; then
    echo "[launch] stopped before the end: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
if [ "$term" = 1 ]; then
  echo "[launch] node $node: trainer ended by SIGTERM (exit code $rc) before the end"
  exit "$rc"
fi
echo "[launch] node $node: $("$PYTHON" -m megatron_lpreg.trainer.restarts "$OUT_DIR" \
  --max-restarts "$MAX_RESTARTS" --exit-code "$rc")"
exit "$rc"
