#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests (CI) and for trying `beseg compare --launcher slurm`.
#
#   scripts/slurm_cluster.sh start [DIR]   write DIR/slurm.conf for this host (default DIR: /tmp/beseg-slurm),
#                                          start munged, slurmctld and slurmd (as root), wait until the node is idle
#   scripts/slurm_cluster.sh stop  [DIR]   stop the daemons started from DIR (by their pid files)
#   scripts/slurm_cluster.sh env   [DIR]   print `export SLURM_CONF=DIR/slurm.conf`
#
# It installs nothing: Debian's slurm-wlm and munge must be there (apt-get install -y slurm-wlm munge; .ci/run does
# it). No slurmdbd: finished jobs are recorded one line each in DIR/jobcomp.txt (JobCompType=jobcomp/filetxt), with
# JobState=COMPLETED, FAILED, CANCELLED... Commands that talk to this cluster need SLURM_CONF=DIR/slurm.conf.
set -euo pipefail

action="${1:-}"
dir="${2:-${BESEG_SLURM_DIR:-/tmp/beseg-slurm}}"
conf="$dir/slurm.conf"

need() {
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || {
            echo "slurm_cluster.sh: $cmd not found; install Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)" >&2
            exit 1
        }
    done
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already answering
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -f /etc/munge/munge.key ]; then
        mungekey -c -k /etc/munge/munge.key 2>/dev/null || mungekey -c
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    su -s /bin/sh munge -c /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "slurm_cluster.sh: munged does not answer (munge -n | unmunge)" >&2
    exit 1
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$conf" <<EOF
ClusterName=beseg
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
MinJobAge=3600
# A requeued job may start again after cred_expire seconds (default 120): short, for the requeue test.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
# A partition with a one-minute MaxTime, for the test of --slurm-time auto: a run longer than that requeues.
PartitionName=short Nodes=$host MaxTime=1 State=UP
EOF
}

stop_pidfile() {
    local file="$1"
    [ -f "$file" ] || return 0
    local pid
    pid="$(cat "$file")"
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$file"
}

case "$action" in
start)
    need munged munge unmunge slurmctld slurmd sinfo
    start_munge
    write_conf
    export SLURM_CONF="$conf"
    slurmctld -c
    slurmd -c
    for _ in $(seq 150); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "slurm_cluster.sh: node $(hostname -s) idle; export SLURM_CONF=$conf"
            exit 0
        fi
        sleep 0.2
    done
    echo "slurm_cluster.sh: the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    sinfo >&2 || true
    exit 1
    ;;
stop)
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    ;;
env)
    echo "export SLURM_CONF=$conf"
    ;;
*)
    echo "usage: $0 start|stop|env [DIR]" >&2
    exit 2
    ;;
esac
