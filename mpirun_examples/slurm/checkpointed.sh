# Sourced by the batch scripts in this folder: run_checkpointed COMMAND [ARGS...] runs the training job
# so that Slurm's warning before the time limit reaches every rank and the run continues in a requeued job.
#
# With `#SBATCH --signal=B:USR1@120` Slurm sends SIGUSR1 to this batch shell 120 s before the time limit.
# The shell passes it on to the job (srun and Open MPI's mpirun forward SIGUSR1 to every rank); train.py
# agrees on a step with all ranks, writes a checkpoint there and exits with status 3; the job then requeues
# itself (`scontrol requeue`: the same job id, so the same --log-dir, and --resume continues the run).
# A job that finishes, fails or is cancelled is not requeued here; after a node failure or a preemption
# Slurm requeues it by itself (`#SBATCH --requeue`).

STOPPED_WITH_CHECKPOINT=3  # train.py's exit status after a signal (train_checkpoints.STOPPED)

run_checkpointed() {
    local job status warned=0
    trap 'warned=1; echo "$(date "+%F %T") time limit near: every rank writes a checkpoint and stops"
          kill -USR1 "$job" 2>/dev/null || true' USR1
    "$@" &
    job=$!
    while :; do  # a trapped signal ends `wait` early: wait again while the job runs
        wait "$job" && status=0 || status=$?
        kill -0 "$job" 2>/dev/null || break
    done
    if [ "$status" -gt 128 ] && [ "$warned" -eq 1 ]; then  # the job ended just as the signal came
        wait "$job" && status=0 || status=$?
    fi
    trap - USR1
    if [ "$status" -eq "$STOPPED_WITH_CHECKPOINT" ] && [ "$warned" -eq 1 ]; then
        echo "$(date "+%F %T") checkpoint written: requeueing job $SLURM_JOB_ID (--resume continues the run)"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
