#!/usr/bin/env bash
# A real two-node Slurm 22.05 cluster on this one machine, for the Slurm tests (needs root, Debian).
#
#   bash scripts/slurm-cluster.sh start    # install (apt) if needed, configure, start munged/slurmctld/2x slurmd
#   bash scripts/slurm-cluster.sh stop
#   bash scripts/slurm-cluster.sh status
#
# Nodes n1 and n2 are two slurmd daemons on 127.0.0.1 (ports 17001-17002), each claiming this
# machine's CPUs. Settings that work here: proctrack/linuxproc and task/none (no cgroups in a
# container), select/cons_tres, per-node spool/pid/log paths via %n.
set -euo pipefail
case " $* " in *" -h "*|*" --help "*) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" ; exit 0;; esac

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/distrib-slurm
LOGS=/var/log/distrib-slurm
CPUS=$(nproc)

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
}

configure() {
    local host
    host=$(hostname)
    grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
    mkdir -p "$STATE/ctld" "$STATE/d/n1" "$STATE/d/n2" "$LOGS" /etc/slurm
    cat > "$CONF" <<EOF
# Written by distrib's scripts/slurm-cluster.sh: a two-node test cluster on one machine.
ClusterName=distrib
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort=6817
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=/run/distrib-slurmctld.pid
SlurmdPidFile=/run/distrib-slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    rm -f /etc/slurm/cgroup.conf  # no cgroups here: proctrack/linuxproc and task/none need none
}

start() {
    install
    configure
    stop_daemons
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    slurmctld
    slurmd -N n1
    slurmd -N n2
    for _ in $(seq 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qv -E 'down|unk|drain|not_responding' \
            && [ "$(sinfo -h -N -t idle,mixed,alloc -o '%N' 2>/dev/null | wc -l)" -ge 2 ]; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm-cluster: nodes did not come up; see $LOGS" >&2
    sinfo >&2 || true
    tail -n 20 "$LOGS"/*.log >&2 || true
    return 1
}

stop_daemons() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0; sleep 0.2; done
}

case "${1:-start}" in
    start) start ;;
    stop) stop_daemons ;;
    status) sinfo && squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
