#!/usr/bin/env bash
# A single-node SLURM cluster on this machine with fake A100 GPUs (its daemons listen on all
# interfaces, every message munge-authenticated), for tests and for trying the
# `slurm` runner profile on a laptop. Everything lives under <state>/slurm.
set -euo pipefail
MONOLM_SCRIPT=local-slurm
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/slurm/local-slurm.sh COMMAND [--cpus N] [--gpus K] [--memory MB] [--partition P]

A one-node SLURM (Debian's slurm-wlm 22.05 + munge) with K fake GPUs of type `a100`, so that
`sbatch --gres=gpu:a100:1` jobs are scheduled and see CUDA_VISIBLE_DEVICES.

Commands:
  install  apt-get install slurm-wlm munge if slurmctld/slurmd/munged are missing (needs root)
  start    install if needed; write slurm.conf, gres.conf, cgroup.conf under <state>/slurm/etc;
           create the fake GPU device files; start munged, slurmctld and slurmd (PID files) and
           wait until `sinfo` shows the node idle. Idempotent. Prints `export SLURM_CONF=...`.
  stop     cancel this cluster's jobs, then stop slurmd, slurmctld and munged by recorded PIDs
  status   daemons and `sinfo` (exit 0 running, 3 stopped)
  env      print `export SLURM_CONF=...` (use: eval "$(infra/slurm/local-slurm.sh env)")

Options (start):
  --cpus N       CPUs of the node (default: nproc; may exceed the real count)
  --gpus K       fake a100 GPUs (default 2)
  --memory MB    RealMemory of the node (default: physical memory minus 1 GiB)
  --partition P  name of the (default) partition (default: gpu)
  --timeout S    seconds to wait for the node to become idle (default 60)
  -h, --help     this help

Facts (checked with slurm 22.05 on Debian 12):
  * ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups needed (containers).
  * sacct needs slurmdbd (accounting_storage/slurmdbd + MySQL); there is no file-based
    accounting storage any more. Instead every finished job is appended to
    <state>/slurm/log/jobcomp.log (JobCompType=jobcomp/filetxt: JobId, UserId, JobState,
    NodeList, ...), and MinJobAge=3600 keeps finished jobs visible to
    `scontrol show job <id>` / `squeue --states=all` for an hour.
  * slurmctld and slurmd listen on all interfaces of their ports (SLURM has no bind-address
    setting); every message is authenticated with this cluster's own munge key.

State (<state> = $MONOLM_STATE_DIR or <repo>/.state): <state>/slurm/{etc,munge,munge-run,dev,
spool,log,run}; daemon output in <state>/slurm/log/{munged.out,slurmctld.log,slurmd.log}.
USAGE
}

STATE="$(monolm_state_dir)"
S_DIR="$STATE/slurm"
ETC="$S_DIR/etc"
MUNGE_DIR="$S_DIR/munge"
DEV_DIR="$S_DIR/dev"
SPOOL="$S_DIR/spool"
LOG_DIR="$S_DIR/log"
RUN_DIR="$S_DIR/run"
CONF="$ETC/slurm.conf"
NODE=monolm-node
# A UNIX socket path must fit 108 bytes: long state paths put the socket in a folder of this
# user's private scratch (/tmp/monolm-<uid>, 0700, checked: lib.sh socket_dir).
# Separate from the key's directory (700): munged wants its socket folder searchable.
SOCKET_DIR="$(socket_dir "$S_DIR/munge-run" 20)"
SOCKET="$SOCKET_DIR/munge.socket.2"

install_needed() {
    local b
    for b in slurmctld slurmd munged sbatch sinfo; do
        command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || return 0
    done
    return 1
}

cmd_install() {
    if ! install_needed; then
        log "slurm and munge are installed ($(slurmctld -V 2>/dev/null || /usr/sbin/slurmctld -V))"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "slurm-wlm/munge are not installed and installing needs root: run 'sudo apt-get install -y slurm-wlm munge'"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and apt-get is not available"
    log "installing Debian's slurm-wlm and munge (apt-get update && apt-get install -y slurm-wlm munge)"
    local t0; t0="$(now_ms)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2
    install_needed && die "apt-get finished but slurmctld/slurmd/munged/sbatch are still missing"
    log "installed in $(( ($(now_ms) - t0) / 1000 )) s"
}

PATH="$PATH:/usr/sbin:/sbin"

# ----------------------------------------------------------------------------- configuration
ports() {
    # Ports are chosen once (6817/6818 when free, else free ports) and then kept, so that a
    # restarted cluster keeps its address.
    if [[ ! -s "$S_DIR/ports" ]]; then
        local c=6817 d=6818
        port_in_use "$c" && c="$(free_port)"
        port_in_use "$d" && d="$(free_port)"
        [[ "$c" != "$d" ]] || d="$(free_port)"
        printf '%s %s\n' "$c" "$d" >"$S_DIR/ports"
    fi
    cat "$S_DIR/ports"
}

# render_config CPUS GPUS MEMORY PARTITION DIR: write slurm.conf, gres.conf, cgroup.conf to DIR.
render_config() {
    local cpus="$1" gpus="$2" mem="$3" part="$4" out="$5" ctld_port slurmd_port host i
    read -r ctld_port slurmd_port < <(ports)
    host="$(hostname -s)"
    local gres=""
    (( gpus > 0 )) && gres=" Gres=gpu:a100:$gpus"
    mkdir -p "$out"
    cat >"$out/slurm.conf" <<EOF
# Written by infra/slurm/local-slurm.sh; rewritten on every start.
ClusterName=monolm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN_DIR/slurmctld.daemon.pid
SlurmdPidFile=$RUN_DIR/slurmd.daemon.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
PlugStackConfig=$ETC/plugstack.conf
# No cgroups: works in containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SchedulerType=sched/backfill
# Start batch jobs at once (default batch_sched_delay=3 s made every job wait ~3 s).
SchedulerParameters=batch_sched_delay=0
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
# The node may claim more CPUs than the machine has (a laptop pretending to be a GPU node).
SlurmdParameters=config_overrides
# No slurmdbd, so no sacct: finished jobs go to a text log instead, and stay visible to
# scontrol/squeue for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem${gres} State=UNKNOWN
PartitionName=$part Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    {
        echo "# Written by infra/slurm/local-slurm.sh: fake A100s backed by character devices."
        echo "AutoDetect=off"
        for (( i=0; i<gpus; i++ )); do
            echo "NodeName=$NODE Name=gpu Type=a100 File=$DEV_DIR/nvidia$i"
        done
    } >"$out/gres.conf"
    cat >"$out/cgroup.conf" <<'EOF'
# Written by infra/slurm/local-slurm.sh. Unused: proctrack/linuxproc and task/none do not use
# cgroups; kept so that switching to proctrack/cgroup + task/cgroup on a real host is one edit.
CgroupPlugin=autodetect
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=no
EOF
    : >"$out/plugstack.conf"
}

make_devices() {
    local gpus="$1" i f
    mkdir -p "$DEV_DIR"
    for (( i=0; i<gpus; i++ )); do
        f="$DEV_DIR/nvidia$i"
        [[ -c "$f" ]] && continue
        rm -f "$f"
        # Major 195 is NVIDIA's; nothing ever opens these, SLURM only stat()s them.
        mknod -m 666 "$f" c 195 "$i" 2>/dev/null || {
            log "mknod is not permitted here; using a regular file as placeholder for $f"
            : >"$f"
        }
    done
}

make_munge_key() {
    mkdir -p "$MUNGE_DIR"
    prepare_socket_dir "$SOCKET_DIR" "$S_DIR/munge-run"
    chmod 700 "$MUNGE_DIR"
    chmod 755 "$SOCKET_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        (umask 077; dd if=/dev/urandom of="$MUNGE_DIR/munge.key.tmp" bs=1024 count=1 status=none)
        mv -f "$MUNGE_DIR/munge.key.tmp" "$MUNGE_DIR/munge.key"
        log "generated this cluster's munge key ($MUNGE_DIR/munge.key, mode 600)"
    fi
    chmod 600 "$MUNGE_DIR/munge.key"
}

export_conf() { export SLURM_CONF="$CONF"; }

node_state() { SLURM_CONF="$CONF" sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }
node_idle() { [[ "$(node_state)" == idle ]]; }
ctld_up() { SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q 'is UP'; }
munge_up() { [[ -S "$SOCKET" ]] && munge --socket="$SOCKET" -n </dev/null | unmunge --socket="$SOCKET" >/dev/null 2>&1; }

all_running() {
    pid_alive "$RUN_DIR/munged.pid" >/dev/null && pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null \
        && pid_alive "$RUN_DIR/slurmd.pid" >/dev/null
}

start_daemon() {
    local name="$1" ready_fn="$2" timeout="$3"; shift 3
    local pid
    if pid="$(pid_alive "$RUN_DIR/$name.pid")"; then
        log "$name already running (pid $pid)"
        return 0
    fi
    pid="$(start_group "$RUN_DIR/$name.pid" "$LOG_DIR/$name.out" "$@")"
    if ! wait_for "$timeout" "$pid" "$name" "$ready_fn"; then
        log_tail "$LOG_DIR/$name.out"
        if [[ -f "$LOG_DIR/$name.log" ]]; then log_tail "$LOG_DIR/$name.log"; fi
        stop_recorded "$RUN_DIR/$name.pid" "$name" TERM:5 KILL:5 || true
        die "$name did not start"
    fi
    log "$name running (pid $pid)"
}

cmd_start() {
    local cpus="$1" gpus="$2" mem="$3" part="$4" timeout="$5" t0
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer"
    [[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus must be a non-negative integer"
    [[ "$mem" =~ ^[1-9][0-9]*$ ]] || die "--memory must be a positive number of MB"
    lock_component "$S_DIR"
    cmd_install
    mkdir -p "$ETC" "$SPOOL/ctld" "$SPOOL/d" "$LOG_DIR" "$RUN_DIR"
    render_config "$cpus" "$gpus" "$mem" "$part" "$S_DIR/etc.new"
    if all_running; then
        if diff -q "$S_DIR/etc.new/slurm.conf" "$CONF" >/dev/null 2>&1 \
            && diff -q "$S_DIR/etc.new/gres.conf" "$ETC/gres.conf" >/dev/null 2>&1; then
            rm -rf "$S_DIR/etc.new"
            wait_for "$timeout" "" "node $NODE idle" node_idle \
                || die "the cluster runs but node $NODE is '$(node_state)', not idle (see $LOG_DIR)"
            log "already running"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        rm -rf "$S_DIR/etc.new"
        die "the cluster runs with other settings (--cpus/--gpus/--memory/--partition); run 'infra/slurm/local-slurm.sh stop' first"
    fi
    local ctld_port slurmd_port
    read -r ctld_port slurmd_port < <(ports)
    if ! pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null && port_in_use "$ctld_port"; then
        die "port $ctld_port (SlurmctldPort) is in use by another process; delete $S_DIR/ports to pick new ports"
    fi
    if ! pid_alive "$RUN_DIR/slurmd.pid" >/dev/null && port_in_use "$slurmd_port"; then
        die "port $slurmd_port (SlurmdPort) is in use by another process; delete $S_DIR/ports to pick new ports"
    fi
    t0="$(now_ms)"
    cp -f "$S_DIR/etc.new/"* "$ETC/"
    rm -rf "$S_DIR/etc.new"
    make_devices "$gpus"
    make_munge_key
    export_conf
    # munged: this cluster's own key and socket, nothing shared with a system munge.
    start_daemon munged munge_up 20 munged --foreground --force \
        --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$RUN_DIR/munged.daemon.pid" \
        --seed-file="$MUNGE_DIR/munged.seed"
    start_daemon slurmctld ctld_up 30 slurmctld -D -f "$CONF"
    # slurmd is ready when its node has registered and is idle (ReturnToService=2).
    start_daemon slurmd node_idle "$timeout" slurmd -D -f "$CONF" -N "$NODE"
    printf 'export SLURM_CONF=%s\n' "$CONF" >"$S_DIR/env"
    log "SLURM up in $(( $(now_ms) - t0 )) ms: node $NODE, $cpus CPUs, $gpus x gpu:a100, partition $part"
    log "use it with: eval \"\$(infra/slurm/local-slurm.sh env)\"   (or: export SLURM_CONF=$CONF)"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    lock_existing "$S_DIR" || { log "not running (nothing under $S_DIR)"; return 0; }
    export_conf
    if pid_alive "$RUN_DIR/slurmctld.pid" >/dev/null && ctld_up; then
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
        if [[ -n "${jobs// /}" ]]; then
            log "cancelling jobs of this cluster: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for 30 "" "jobs to end" bash -c '[[ -z "$(squeue -h -o %i 2>/dev/null)" ]]' \
                || log "jobs still listed after 30 s; stopping the daemons anyway"
        fi
    fi
    stop_recorded "$RUN_DIR/slurmd.pid" slurmd TERM:15 KILL:5
    stop_recorded "$RUN_DIR/slurmctld.pid" slurmctld TERM:15 KILL:5
    stop_recorded "$RUN_DIR/munged.pid" munged TERM:10 KILL:5
    if [[ "$SOCKET_DIR" != "$S_DIR/munge-run" ]]; then rm -rf "$SOCKET_DIR"; fi
    rm -f "$S_DIR/env"
}

cmd_status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid="$(pid_alive "$RUN_DIR/$name.pid")"; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"; rc=3
        fi
    done
    if [[ "$rc" == 0 ]]; then
        SLURM_CONF="$CONF" sinfo -o '%P %a %D %T %c %m %G' || true
        echo "export SLURM_CONF=$CONF"
    fi
    return "$rc"
}

cmd_env() {
    [[ -f "$CONF" ]] || die "no cluster configured under $S_DIR: run 'infra/slurm/local-slurm.sh start'"
    echo "export SLURM_CONF=$CONF"
}

main() {
    local cmd cpus gpus=2 mem part=gpu timeout=60
    cpus="$(nproc)"
    mem=$(( $(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
    (( mem > 256 )) || mem=256
    parse_command_line --cpus=cpus --gpus=gpus --memory=mem --partition=part --timeout=timeout -- "$@"
    case "$cmd" in
        -h|--help|help) usage ;;
        install) cmd_install ;;
        start) cmd_start "$cpus" "$gpus" "$mem" "$part" "$timeout" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) cmd_env ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
