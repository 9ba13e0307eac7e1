#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/cli/test_slurm.py (and for trying
# slurm/train.sh by hand). Needs root and Debian/Ubuntu apt; no systemd needed: the daemons are
# started directly. Idempotent: a cluster left by an earlier run is stopped and started afresh.
#
#   sudo tests/slurm/setup.sh            # prints the SLURM_CONF to export
#   export SLURM_CONF=/tmp/simcse-slurm/slurm.conf
#   GPUS_PER_NODE=0 NPROC_PER_NODE=2 sbatch slurm/train.sh --config configs/demo.yaml
#   sudo tests/slurm/teardown.sh
#
# The cluster: partition "debug" with SIMCSE_SLURM_NODES (default 2) nodes simcse-node1, ...,
# each a slurmd on this machine (NodeAddr 127.0.0.1, its own port) owning an equal share of the
# CPUs and of 80% of the memory, so multi-node jobs (srun over nodes, torchrun rendezvous) run
# for real. Environment: SIMCSE_SLURM_DIR (scratch dir: config, state, spool, logs, pid files;
# default /tmp/simcse-slurm), SIMCSE_SLURMCTLD_PORT (default 16817) and SIMCSE_SLURMD_PORT (the
# first node's; default 16818): not Slurm's 6817/6818, so a real Slurm here is left alone.
# Exit status: 0 ready, 77 cannot run here (not root, no apt, packages not installable), 1 failed.
set -eo pipefail

DIR="${SIMCSE_SLURM_DIR:-/tmp/simcse-slurm}"
CTLD_PORT="${SIMCSE_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${SIMCSE_SLURMD_PORT:-16818}"
NODES="${SIMCSE_SLURM_NODES:-2}"
HERE="$(cd "$(dirname "$0")" && pwd)"
say() { echo "setup.sh: $*"; }
cannot() { echo "setup.sh: cannot run here: $*"; exit 77; }

[[ $(id -u) == 0 ]] || cannot "needs root (it installs packages and starts munged, slurmctld, slurmd)"

# -- packages ---------------------------------------------------------------------------------
need=()
for exe in /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client /usr/sbin/munged:munge; do
    [[ -x ${exe%%:*} ]] || need+=("${exe##*:}")
done
if (( ${#need[@]} )); then
    command -v apt-get >/dev/null || cannot "missing ${need[*]} and no apt-get to install them"
    say "installing ${need[*]}"
    # Keep the packages' maintainer scripts from starting the daemons with the system config
    # (they would on a machine with systemd): policy-rc.d says "not now" for the install only.
    policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    fi
    rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge; } || rc=$?
    [[ -n $policy ]] && rm -f "$policy"
    (( rc == 0 )) || cannot "apt-get install ${need[*]} failed (exit $rc)"
fi

# -- a clean slate: stop what an earlier run of this script left --------------------------------
"$HERE/teardown.sh" --quiet || true
rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
mkdir -p "$DIR"/{state,spool,log}

# -- munge (authentication between the Slurm daemons and commands) -----------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running: reusing it"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || { echo "setup.sh: munged does not answer"; exit 1; }
    cp /run/munge/munged.pid "$DIR/munged.pid"  # teardown stops the munged that we started, only that one
    say "started munged (pid $(cat "$DIR/munged.pid"))"
fi

# -- slurm.conf -------------------------------------------------------------------------------
# Each node claims an equal share of the CPUs (never more than slurmd detects: a node that claims
# more than the hardware has is drained) and of 80% of the memory, so a job's --mem fits.
cpus=$(slurmd -C | head -n1 | grep -oE 'CPUs=[0-9]+' | cut -d= -f2) || true
cpus=${cpus:-$(nproc)}
cpus_per_node=$(( cpus / NODES > 0 ? cpus / NODES : 1 ))
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 8 / 10 / 1024 / NODES ))
node_lines=""
for i in $(seq "$NODES"); do
    node_lines+="NodeName=simcse-node$i NodeAddr=127.0.0.1 Port=$(( SLURMD_PORT + i - 1 )) CPUs=$cpus_per_node RealMemory=$mem_mb State=UNKNOWN"$'\n'
done
cat > "$DIR/slurm.conf" <<CONF
# Written by tests/slurm/setup.sh: a test cluster on one machine. Do not use in production.
ClusterName=simcse-test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials expire after 10 s, so a requeued job may start again ~15 s later (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to 'scontrol show job' for 10 minutes (there is no sacct).
MinJobAge=600
# SIGTERM to SIGKILL on scancel/requeue: time for the trainer to write its checkpoint (Slurm default).
KillWait=30
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"

# -- daemons ----------------------------------------------------------------------------------
running() {  # running NAME PIDFILE: the daemon whose pid is in PIDFILE is alive
    local pid; pid=$(cat "$2" 2>/dev/null) && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}
start() {  # start NAME PIDFILE ARGS...: daemonizes; fails if it exits (e.g. its port is taken)
    rm -f "$2"
    "/usr/sbin/$1" -f "$SLURM_CONF" "${@:3}"
    for _ in $(seq 50); do running "$1" "$2" && break; sleep 0.1; done
    sleep 0.3
    running "$1" "$2" || { echo "setup.sh: $1 $* did not start:"; tail -n 20 "$DIR"/log/*.log; exit 1; }
}
start slurmctld "$DIR/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
for i in $(seq "$NODES"); do
    mkdir -p "$DIR/spool/simcse-node$i"
    start slurmd "$DIR/slurmd-simcse-node$i.pid" -N "simcse-node$i"
done
states=""
for _ in $(seq 150); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    [[ $states == "idle " ]] && break
    sleep 0.2
done
if [[ $states != "idle " ]]; then
    echo "setup.sh: nodes are '${states:-unknown}' after 30 s, not idle"
    sinfo -N -l || true
    tail -n 20 "$DIR"/log/*.log || true
    exit 1
fi
say "cluster up: partition $(sinfo -h -o '%P: %D nodes %N, %T, %c CPU(s) and %m MB each' | head -n1)"
echo "export SLURM_CONF=$SLURM_CONF"
