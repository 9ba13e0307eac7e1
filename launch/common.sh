# Sourced by launch/*.sh and slurm/train.sh: run a launcher (torchrun, deepspeed) and report a
# clean stop as success. torchrun exits 1 after it forwarded SIGTERM/SIGINT to ranks that then
# wrote a checkpoint and exited 0; rank 0 records how the run ended in $SIMCSE_STATUS_FILE
# ({"status": "done"|"stopped", "step": N}), and a run that ended so exits 0 here.
#
# Signals: Ctrl-C reaches the launcher and the ranks directly (same process group): the ranks
# finish their step, checkpoint and exit, and a second Ctrl-C aborts them. SIGTERM sent to this
# script goes to the launcher's children (torchrun's ranks; the deepspeed runner's per-node
# launcher, which passes it on to its ranks), not to the launcher itself: the deepspeed runner
# dies at once on SIGTERM, leaving its ranks to find out on their own. The launcher then exits
# when its ranks have checkpointed.
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT: how long torchrun lets the ranks finish after a signal before
# it kills them (torch's default, 30 s, is too short for a large checkpoint).

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

clean_stop() {  # clean_stop RC: RC, or 0 when the trainer recorded that it finished or stopped
    local rc=$1
    if (( rc != 0 )) && [[ -n $SIMCSE_STATUS_FILE ]] \
            && grep -qE '"status": "(done|stopped)"' "$SIMCSE_STATUS_FILE" 2>/dev/null; then
        echo "launch: the launcher exited $rc after the trainer ended cleanly ($(tr -d '\n' < "$SIMCSE_STATUS_FILE")); exit 0" >&2
        rc=0
    fi
    return "$rc"
}

run_launcher() {  # run_launcher CMD...: run CMD, forward SIGTERM, exit as clean_stop says
    local own_status=""
    if [[ -z $SIMCSE_STATUS_FILE ]]; then
        SIMCSE_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/simcse-status.XXXXXX"); own_status=1
    fi
    export SIMCSE_STATUS_FILE
    rm -f "$SIMCSE_STATUS_FILE"
    "$@" &
    local child=$! rc=0
    trap 'true' INT
    trap 'pkill -TERM -P "$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null' TERM
    while kill -0 "$child" 2>/dev/null; do wait "$child" 2>/dev/null; done
    wait "$child"; rc=$?
    trap - INT TERM
    clean_stop "$rc"; rc=$?
    [[ -n $own_status ]] && rm -f "$SIMCSE_STATUS_FILE"
    return "$rc"
}
