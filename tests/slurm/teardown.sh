#!/usr/bin/env bash
# Stops the cluster that tests/slurm/setup.sh started: cancels its jobs, then stops slurmd,
# slurmctld and munged (munged only if setup.sh started it), each by the pid in its pid file.
# Safe to run when nothing is running. Logs stay in $SIMCSE_SLURM_DIR/log.
set -o pipefail
DIR="${SIMCSE_SLURM_DIR:-/tmp/simcse-slurm}"
quiet=""; [[ $1 == --quiet ]] && quiet=1
say() { [[ -n $quiet ]] || echo "teardown.sh: $*"; }

# Running, not a zombie (an exited daemon stays a zombie until init reaps it, and kill -0 works on it).
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
pid_of() { [[ -s $1 ]] && cat "$1"; }

stop() {  # stop NAME PIDFILE
    local pid; pid=$(pid_of "$2") || return 0
    # Only signal the pid if it is still the daemon we started (pids are reused).
    if alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && { say "$1 (pid $pid) ignores SIGTERM: SIGKILL"; kill -KILL "$pid"; }
        say "stopped $1 (pid $pid)"
    fi
    rm -f "$2"
}

if [[ -f $DIR/slurm.conf ]] && [[ -s $DIR/slurmctld.pid ]] && alive "$(cat "$DIR/slurmctld.pid")"; then
    export SLURM_CONF="$DIR/slurm.conf"
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
        say "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        for _ in $(seq 60); do [[ -z $(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
fi
for pidfile in "$DIR"/slurmd*.pid; do [[ -e $pidfile ]] && stop slurmd "$pidfile"; done
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"
exit 0
