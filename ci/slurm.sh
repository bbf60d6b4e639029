#!/usr/bin/env bash
# A real single-node SLURM on 127.0.0.1 for dmlkit's tests (munged, slurmctld, slurmd).
#
#   bash ci/slurm.sh up            install the packages if missing (root only), start the
#                                  daemons if they are not running; idempotent
#   bash ci/slurm.sh down [--force]  stop the daemons this script started (by recorded PID),
#                                  unless a `with` run still uses them (--force: anyway)
#   bash ci/slurm.sh with CMD...   up, run CMD, down (also when CMD fails); exits with CMD's status
#   bash ci/slurm.sh status
#
# There is no systemd here: the daemons run in the background with their PIDs in
# $DMLKIT_SLURM_DIR/pids. The configuration is $DMLKIT_SLURM_DIR/slurm.conf, so /etc/slurm is
# left alone; clients find it with `export SLURM_CONF=$DMLKIT_SLURM_DIR/slurm.conf` (the
# tests do that themselves). Not root and SLURM missing: prints why and exits 0 (the
# tests marked `slurm` then skip).
set -uo pipefail

DIR=${DMLKIT_SLURM_DIR:-/tmp/dmlkit-slurm}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
LEASES=$DIR/leases
HOST=$(hostname -s)
CTLD_PORT=${DMLKIT_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DMLKIT_SLURMD_PORT:-6818}
START_TIMEOUT=${DMLKIT_SLURM_START_TIMEOUT:-60}
PACKAGES=(munge slurmctld slurmd slurm-client)
export SLURM_CONF=$CONF

say() { echo "ci/slurm.sh: $*" >&2; }

LOCKED=0
lock() {  # serialise concurrent up/down (fd 9 is closed for the daemons); not for non-root users
    mkdir -p "$DIR" "$LEASES" 2>/dev/null
    if [[ -w $DIR/lock || ( ! -e $DIR/lock && -w $DIR ) ]]; then
        exec 9>>"$DIR/lock" && flock 9 && LOCKED=1
    fi
}
unlock() { if (( LOCKED )); then flock -u 9; exec 9>&-; LOCKED=0; fi; }
lease() { touch "$LEASES/$1" 2>/dev/null || true; }

alive() {  # alive NAME PID: PID runs a program called NAME
    [[ -n ${2:-} ]] && kill -0 "$2" 2>/dev/null && [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]
}

recorded() { [[ -f $PIDS ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n 1; }

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

controller_answers() { timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }

node_ready() {
    local state
    state=$(timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
    [[ $state =~ ^(idle|mixed|allocated|completing) ]]
}

install_packages() {
    local missing=0 tool
    for tool in munged slurmctld slurmd sinfo sbatch; do
        command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null || missing=1
    done
    export PATH=$PATH:/usr/sbin:/sbin
    (( missing )) || return 0
    if (( EUID != 0 )) || ! command -v apt-get >/dev/null; then
        say "SLURM is not installed and this is not root with apt-get: skipping (install ${PACKAGES[*]})"
        return 1
    fi
    say "installing ${PACKAGES[*]}"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}")
    if ! "${apt[@]}" >"$DIR/apt.log" 2>&1; then
        apt-get update -qq >>"$DIR/apt.log" 2>&1
        if ! "${apt[@]}" >>"$DIR/apt.log" 2>&1; then
            tail -n 20 "$DIR/apt.log" >&2
            say "could not install ${PACKAGES[*]} (log: $DIR/apt.log): skipping"
            return 1
        fi
    fi
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    (( cpus < 8 )) && cpus=8  # config_overrides: room for a few 1-core test jobs at once
    mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    (( mem < 8192 )) && mem=8192  # must exceed what the Dask jobs ask, or sbatch rejects them
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<CONF
# Single-node SLURM for dmlkit's tests, written by ci/slurm.sh.
ClusterName=dmlkit
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=10
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start_daemon() {  # start_daemon NAME CMD...: in the background, detached, PID recorded
    local name=$1; shift
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
    local pid=$!
    echo "$name $pid" >>"$PIDS"
    sleep 0.2
    if ! alive "$name" "$pid"; then
        say "$name did not start; $DIR/log/$name.out says:"
        tail -n 20 "$DIR/log/$name.out" >&2
        return 1
    fi
}

stop_daemons() {
    [[ -f $PIDS ]] || return 0
    if controller_answers; then  # cancel the jobs first: their steps outlive slurmd
        local jobs
        jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// } ]]; then
            say "cancelling jobs $jobs"
            timeout 5 scancel $jobs 2>/dev/null
            for _ in $(seq 50); do
                [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(recorded "$name")
        alive "$name" "$pid" && kill -TERM "$pid"
    done
    for name in slurmd slurmctld munged; do
        pid=$(recorded "$name")
        for _ in $(seq 50); do alive "$name" "$pid" || break; sleep 0.2; done
        alive "$name" "$pid" && { say "$name ($pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; }
    done
    rm -f "$PIDS"
}

up() {
    install_packages || return 0
    if controller_answers && node_ready; then
        say "SLURM is up ($CONF)"
        return 0
    fi
    if (( EUID != 0 )); then
        say "SLURM is not running and starting it needs root: skipping"
        return 0
    fi
    local t0=$SECONDS
    stop_daemons  # whatever is left of an earlier start
    write_conf
    if ! munge_works; then
        mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
        if [[ ! -s /etc/munge/munge.key ]]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
            chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
        fi
        start_daemon munged setpriv --reuid=munge --regid=munge --init-groups \
            "$(command -v munged)" --foreground || return 1
        for _ in $(seq 50); do munge_works && break; sleep 0.1; done
        munge_works || { say "munged started but munge -n | unmunge fails"; return 1; }
    fi
    start_daemon slurmctld "$(command -v slurmctld)" -D -i -c -f "$CONF" || return 1
    start_daemon slurmd "$(command -v slurmd)" -D -f "$CONF" || return 1
    local deadline=$((SECONDS + START_TIMEOUT))
    until controller_answers && node_ready; do
        if (( SECONDS > deadline )); then
            say "SLURM did not become ready within ${START_TIMEOUT} s; logs in $DIR/log:"
            tail -n 15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2
            timeout 5 sinfo >&2
            stop_daemons
            return 1
        fi
        sleep 0.3
    done
    say "SLURM is up in $((SECONDS - t0)) s: node $HOST, $(sinfo -h -o '%c CPUs, %m MB') (export SLURM_CONF=$CONF)"
}

live_leases() {  # leases held by running processes ("manual" from `up` always counts)
    local f
    for f in "$LEASES"/*; do
        [[ -e $f ]] || continue
        local id=${f##*/}
        if [[ $id == manual ]] || kill -0 "$id" 2>/dev/null; then echo "$id"; else rm -f "$f"; fi
    done
}

down() {  # down LEASE [--force]
    rm -f "$LEASES/$1"
    local others
    others=$(live_leases | tr '\n' ' ')
    if [[ -n ${others// } && ${2:-} != --force ]]; then
        say "SLURM left running: still used by ${others}(down --force stops it anyway)"
        return 0
    fi
    stop_daemons
    rm -f "$LEASES"/*
    say "SLURM stopped"
}

case ${1:-} in
    up)
        lock; up; status=$?; (( status == 0 )) && lease manual; unlock; exit $status ;;
    down)
        lock; down manual "${2:-}"; status=$?; unlock; exit $status ;;
    with)
        shift
        (( $# )) || { say "usage: $0 with CMD..."; exit 2; }
        lock; up; status=$?; (( status == 0 )) && lease $$; unlock
        (( status == 0 )) || exit $status
        trap 'lock; down $$; unlock' EXIT
        trap 'exit 130' INT TERM
        "$@"
        exit $? ;;
    status)
        if controller_answers; then sinfo; squeue; else echo "SLURM is not running"; exit 1; fi ;;
    *)
        echo "usage: $0 up | down [--force] | with CMD... | status" >&2; exit 2 ;;
esac
