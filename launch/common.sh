# Sourced by launch/torchrun.sh, launch/cpu-gloo.sh and launch/deepspeed.sh: run a launcher
# (torchrun, deepspeed) and report a clean stop as success. torchrun exits 1 after it forwarded
# SIGTERM/SIGINT to ranks that then wrote a checkpoint and exited 0; rank 0 records how the run
# ended in $SIMCSE_STATUS_FILE, and `python -m simcse_dist.cli.status RC` (the rule, shared with
# slurm/train.sh) turns a run that ended so into exit 0.
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

run_launcher() {  # run_launcher CMD...: run CMD, forward SIGTERM, exit as simcse_dist.cli.status says
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
    "${PYTHON:-python}" -m simcse_dist.cli.status "$rc"; rc=$?
    [[ -n $own_status ]] && rm -f "$SIMCSE_STATUS_FILE"
    return "$rc"
}
