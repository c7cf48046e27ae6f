#!/usr/bin/env bash
# Shared helpers for the infra/ scripts: state directory, PID files, process-group start/stop,
# readiness polling, free ports. Sourced, not run.
#
# Why PID files with start times: other people's processes share this machine, so nothing here
# ever stops a process by name. A PID file records the PID *and* the kernel start time of the
# process we launched; a recycled PID (a different process that got the same number later) has a
# different start time and is never signalled.
#
# Why process groups: every long-running service is launched with `setsid`, so it leads its own
# session and process group. Stopping signals the whole group, which also catches the children it
# spawned (uvicorn workers, flow-run subprocesses), and nothing outside it.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    cat <<'EOF'
infra/lib.sh - helpers sourced by the infra/ scripts (state dir, PID files, start/stop by
recorded process group, readiness polling, free ports). Not a command: source it.

Commands: none (use infra/server/prefect-server.sh, infra/postgres/postgres.sh, infra/worker.sh,
infra/serve.sh, infra/slurm/local-slurm.sh, infra/free-port.sh).
EOF
    exit 0
fi

MONOLM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MONOLM_REPO_ROOT

# Everything the infra scripts and the services they start write (state folders, logs, the
# Prefect database, PID and URL files) is for this user only: other users of a shared login
# node must not read the database or the logs. Files that others must reach get their mode
# explicitly (PostgreSQL's folder when run as root, munge's socket folder).
umask 077

# The project-local state directory (absolute): $MONOLM_STATE_DIR or <repo>/.state. Not created
# here: `--help` and `status` must not leave directories behind; commands create what they use.
monolm_state_dir() {
    realpath -m -- "${MONOLM_STATE_DIR:-$MONOLM_REPO_ROOT/.state}"
}

# secure_state_dir: create the state directory with mode 700, or take read and write away from
# group and others on an existing one of ours (a checkout from before this rule; search
# permission stays, which PostgreSQL run as root needs to reach its folder).
secure_state_dir() {
    local state
    state="$(monolm_state_dir)"
    if [[ ! -d "$state" ]]; then
        mkdir -p -- "$(dirname -- "$state")"
        mkdir -m 700 -- "$state" 2>/dev/null || [[ -d "$state" ]] || die "cannot create $state"
    elif [[ -O "$state" ]]; then
        chmod go-rw -- "$state"
    fi
}

log() { printf '[%s] %s\n' "${MONOLM_SCRIPT:-infra}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${MONOLM_SCRIPT:-infra}" "$*" >&2; exit 1; }

# venv_tool NAME PATHNAME MESSAGE: the project venv's NAME if present, else PATHNAME on PATH,
# else die with MESSAGE. One lookup order for every tool the scripts run.
venv_tool() {
    if [[ -x "$MONOLM_REPO_ROOT/.venv/bin/$1" ]]; then
        echo "$MONOLM_REPO_ROOT/.venv/bin/$1"
    elif command -v "$2" >/dev/null 2>&1; then
        command -v "$2"
    else
        die "$3"
    fi
}

# A Python interpreter for small helpers: the project venv if present, else python3.
monolm_python() {
    venv_tool python python3 "no Python found (.venv/bin/python or python3)"
}

# The prefect CLI: $MONOLM_PREFECT, the project venv's, or the one on PATH.
monolm_prefect() {
    if [[ -n "${MONOLM_PREFECT:-}" ]]; then
        echo "$MONOLM_PREFECT"
    else
        venv_tool prefect prefect "the prefect CLI was not found: run 'make install' (creates .venv) or set MONOLM_PREFECT"
    fi
}

# parse_command_line --OPTION=VAR[:VALUE]... -- ARG...: the front of every infra script's main.
# Sets the caller's `cmd` to the first ARG (usage on stderr and exit 2 when there is none), then
# reads the other ARGs as options: --OPTION=VAR takes the next word into the caller's VAR,
# --OPTION=VAR:VALUE is a flag that sets VAR to VALUE; -h/--help prints usage and exits 0; any
# other word is an error. It assigns by name (bash's dynamic scope): main declares the
# variables local, with their defaults, before calling it.
parse_command_line() {
    local -A _takes=() _flags=()
    local _spec _opt
    while [[ $# -gt 0 && "$1" != -- ]]; do
        _opt="${1%%=*}" _spec="${1#*=}"; shift
        if [[ "$_spec" == *:* ]]; then _flags[$_opt]="$_spec"; else _takes[$_opt]="$_spec"; fi
    done
    shift
    cmd="${1:-}"
    [[ -n "$cmd" ]] || { usage >&2; exit 2; }
    shift || true
    while [[ $# -gt 0 ]]; do
        _opt="$1"
        if [[ "$_opt" == -h || "$_opt" == --help ]]; then
            usage; exit 0
        elif [[ -n "$_opt" && -n "${_takes[$_opt]:-}" ]]; then
            printf -v "${_takes[$_opt]}" '%s' "${2:?$_opt needs a value}"; shift 2
        elif [[ -n "$_opt" && -n "${_flags[$_opt]:-}" ]]; then
            printf -v "${_flags[$_opt]%%:*}" '%s' "${_flags[$_opt]#*:}"; shift
        else
            die "unknown option: $_opt (see --help)"
        fi
    done
}

# ensure_secret FILE PREFIX WHAT: write PREFIX and 48 random hex digits to FILE (mode 600,
# atomically, never printed) unless it holds something already: generated once and kept across
# restarts, so whoever holds it (workers, SLURM jobs, the database role) keeps working.
ensure_secret() {
    local file="$1" prefix="$2" what="$3"
    if [[ ! -s "$file" ]]; then
        local secret
        secret="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
        (umask 077; printf '%s%s\n' "$prefix" "$secret" >"$file.tmp")
        mv -f "$file.tmp" "$file"
        log "generated $what in $file (mode 600)"
    fi
    chmod 600 "$file"
}

# ----------------------------------------------------------------------------- the Prefect API
# monolm_api_auth URL: export PREFECT_API_AUTH_STRING from <state>/prefect/auth (the server's
# generated auth string) unless it is set already, when URL is the API of the server started
# from this state dir (never our secret to another server). Through the environment only:
# processes started from here (worker, flow runs, sbatch jobs) inherit it, and it never appears
# on a command line.
monolm_api_auth() {
    local dir file; dir="$(monolm_state_dir)/prefect"; file="$dir/auth"
    [[ -s "$dir/api_url" && "$(<"$dir/api_url")" == "$1" ]] || return 0
    if [[ -z "${PREFECT_API_AUTH_STRING:-}" && -s "$file" ]]; then
        PREFECT_API_AUTH_STRING="$(<"$file")"
        export PREFECT_API_AUTH_STRING
    fi
}

# api_request METHOD BASE PATH [JSON]: call the Prefect API at BASE (…/api) with the auth string
# and, for a state-changing METHOD, a CSRF token. Secrets go to curl as a config on stdin, never
# as arguments. Prints the response body; fails on an HTTP error.
api_request() {
    local method="$1" base="$2" path="$3" data="${4:-}" cfg="" client token
    if [[ -n "${PREFECT_API_AUTH_STRING:-}" ]]; then
        cfg+="header = \"Authorization: Basic $(printf '%s' "$PREFECT_API_AUTH_STRING" | base64 -w0)\""$'\n'
    fi
    if [[ "$method" != GET ]]; then
        client="monolm-infra-$$-$RANDOM"
        # A server without CSRF protection answers 422 here: then no token is needed.
        if token="$(printf '%s' "$cfg" | curl -fsS --max-time 5 -K - "$base/csrf-token?client=$client" 2>/dev/null \
                | "$(monolm_python)" -c 'import json, sys; print(json.load(sys.stdin)["token"])' 2>/dev/null)"; then
            cfg+="header = \"Prefect-Csrf-Token: $token\""$'\n'"header = \"Prefect-Csrf-Client: $client\""$'\n'
        fi
    fi
    local args=(-fsS --max-time 5 -K - -X "$method")
    [[ -n "$data" ]] && args+=(-H 'Content-Type: application/json' -d "$data")
    printf '%s' "$cfg" | curl "${args[@]}" "$base$path"
}

# ----------------------------------------------------------------------------- processes
# Kernel start time (clock ticks since boot) of PID, or failure if it is gone or a zombie.
proc_start_time() {
    local stat rest
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    rest="${stat##*) }"          # fields after "(comm) ", comm may contain spaces
    # shellcheck disable=SC2086
    set -- $rest                 # $1 = state (field 3), so field 22 (starttime) is ${20}
    [[ "$1" != "Z" && "$1" != "X" ]] || return 1
    echo "${20}"
}

# pid_write FILE PID: record PID and its start time (FILE, FILE.start), atomically.
pid_write() {
    local file="$1" pid="$2" start
    start="$(proc_start_time "$pid")" || die "process $pid exited right after it was started"
    printf '%s\n' "$pid" >"$file.tmp" && mv -f "$file.tmp" "$file"
    printf '%s\n' "$start" >"$file.start.tmp" && mv -f "$file.start.tmp" "$file.start"
}

# pid_alive FILE: print the recorded PID and succeed if that very process is still running.
pid_alive() {
    local file="$1" pid want have
    [[ -s "$file" ]] || return 1
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    have="$(proc_start_time "$pid")" || return 1
    if [[ -s "$file.start" ]]; then
        want="$(<"$file.start")"
        [[ "$want" == "$have" ]] || return 1
    fi
    echo "$pid"
}

pid_clear() { rm -f "$1" "$1.start"; }

# PIDs of the running (non-zombie) processes among ROOT..., their descendants (by parent PID)
# and the members of the process groups they lead. Exact: no matching by name.
process_tree() {
    ps -e -o pid=,ppid=,pgid=,stat= 2>/dev/null | awk -v roots="$*" '
        $4 !~ /^Z/ { pp[$1] = $2; pg[$1] = $3 }
        END {
            n = split(roots, r, " ")
            for (i = 1; i <= n; i++) if (r[i] in pp) { keep[r[i]] = 1; leader[r[i]] = 1 }
            changed = 1
            while (changed) {
                changed = 0
                for (p in pp) if (!(p in keep) && ((pp[p] in keep) || (pg[p] in leader))) {
                    keep[p] = 1; changed = 1
                }
            }
            for (p in keep) print p
        }'
}

# stop_recorded FILE NAME SIGNAL:SECONDS[:children]...
#   Send each signal in turn to the recorded process, every descendant it has spawned (even
#   those that moved to their own session, like Prefect's flow-run processes) and its process
#   group, waiting up to SECONDS each time for all of them to be gone; then clear the PID file.
#   With ":children", the wait also ends once only the recorded process itself is left (for a
#   parent that ignores the signal but whose children should get a chance to exit cleanly).
#   Succeeds when nothing was running. Example: stop_recorded worker.pid worker INT:15 TERM:10 KILL:5
stop_recorded() {
    local file="$1" name="$2"; shift 2
    local pid step sig secs mode deadline p st
    local -A victims=()   # pid -> kernel start time, so a recycled PID is never signalled
    if ! pid="$(pid_alive "$file")"; then
        pid_clear "$file"
        log "$name is not running"
        return 0
    fi
    _refresh_victims() {
        local alive=() q
        for q in "${!victims[@]}"; do
            if [[ "$(proc_start_time "$q" 2>/dev/null)" == "${victims[$q]}" ]]; then alive+=("$q"); else unset "victims[$q]"; fi
        done
        for q in $(process_tree "${alive[@]}"); do
            [[ -n "${victims[$q]:-}" ]] && continue
            st="$(proc_start_time "$q" 2>/dev/null)" && victims[$q]="$st"
        done
    }
    if ! st="$(proc_start_time "$pid")"; then   # exited just now
        pid_clear "$file"
        log "$name is not running"
        return 0
    fi
    victims[$pid]="$st"
    _refresh_victims
    for step in "$@"; do
        IFS=: read -r sig secs mode <<<"$step"
        _refresh_victims
        (( ${#victims[@]} )) || break
        log "sending SIG$sig to $name (pid $pid; ${#victims[@]} process(es) in its tree)"
        for p in "${!victims[@]}"; do
            kill -s "$sig" "$p" 2>/dev/null || true
        done
        deadline=$(( $(now_ms) + secs * 1000 ))
        while (( $(now_ms) < deadline )); do
            _refresh_victims
            (( ${#victims[@]} )) || break
            if [[ "$mode" == children && ${#victims[@]} == 1 && -n "${victims[$pid]:-}" ]]; then
                break
            fi
            sleep 0.1
        done
    done
    _refresh_victims
    if (( ${#victims[@]} )); then
        die "$name: process(es) ${!victims[*]} still running after $*"
    fi
    pid_clear "$file"
    log "$name stopped"
}

# start_group FILE LOG CMD...: run CMD in its own session/process group, detached from this
# terminal, stdout+stderr appended to LOG; record its PID in FILE. Prints the PID.
start_group() {
    local file="$1" logfile="$2"; shift 2
    : >>"$logfile"
    # In a non-interactive shell a background job is not a process-group leader, so setsid(1)
    # calls setsid() in place (no fork) and $! is the new session's leader.
    # fd 9 is the component lock (lock_component): the daemon must not inherit it.
    setsid "$@" >>"$logfile" 2>&1 </dev/null 9>&- &
    local pid=$!
    pid_write "$file" "$pid"
    echo "$pid"
}

# ms since the epoch, for timing start-ups.
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# wait_for TIMEOUT_S PID DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds. Fails early
# if PID (when not empty) exits, or after TIMEOUT_S seconds.
wait_for() {
    local timeout="$1" pid="$2" what="$3"; shift 3
    local deadline=$(( $(now_ms) + timeout * 1000 ))
    while (( $(now_ms) < deadline )); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! proc_start_time "$pid" >/dev/null; then
            log "$what: the process (pid $pid) exited before it became ready"
            return 1
        fi
        sleep 0.2
    done
    log "$what: not ready after ${timeout}s"
    return 1
}

# Print the last lines of a log, for error messages.
log_tail() {
    local file="$1" n="${2:-40}"
    [[ -f "$file" ]] || return 0
    printf -- '----- last %s lines of %s -----\n' "$n" "$file" >&2
    tail -n "$n" "$file" >&2
    printf -- '-----\n' >&2
}

# ----------------------------------------------------------------------------- ports
# Is anything listening on TCP PORT (any address)?
port_in_use() {
    local port="$1"
    if command -v ss >/dev/null 2>&1; then
        [[ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

# A TCP port that is free on 127.0.0.1 right now (the kernel picks it).
free_port() {
    "$(monolm_python)" - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# ----------------------------------------------------------------------------- private scratch
# Sockets whose folder path is too long go to a per-user scratch folder, never to a shared
# predictable /tmp name: another user could create that name first and own the socket's folder.
# scratch_dir [OWNER]: the path (not created) of OWNER's scratch folder: $MONOLM_SCRATCH for the
# current user, else /tmp/monolm-<uid> (short, for socket paths). The same folder as the Python
# side's monolm.core.private.private_scratch().
scratch_dir() {
    local owner="${1:-$(id -un)}" uid
    uid="$(id -u "$owner")" || die "no such user: $owner"
    if [[ "$uid" == "$(id -u)" && -n "${MONOLM_SCRATCH:-}" ]]; then
        echo "$MONOLM_SCRATCH"
    else
        echo "/tmp/monolm-$uid"
    fi
}

# check_private_dir DIR UID: fail unless DIR is a folder (not a link) owned by UID with no
# permission for group or others. Never repairs: a folder someone else made may hold their files.
check_private_dir() {
    local dir="$1" uid="$2" info owner mode
    [[ -d "$dir" && ! -L "$dir" ]] || die "private folder $dir is a link or a file, not a folder; remove it or set MONOLM_SCRATCH"
    info="$(stat -c '%u %a' -- "$dir")" || die "cannot stat private folder $dir"
    owner="${info% *}" mode="${info#* }"
    [[ "$owner" == "$uid" ]] \
        || die "private folder $dir belongs to user id $owner, not $uid: someone else created it; remove it or set MONOLM_SCRATCH to a folder of your own"
    (( (8#$mode & 8#077) == 0 )) \
        || die "private folder $dir has mode $mode, open to other users: it must be 700 (chmod 700 $dir if you trust what is inside, else remove it)"
}

# ensure_private_dir DIR [OWNER]: create DIR with mode 700 (owned by OWNER, default the current
# user) when absent, then check it (check_private_dir) in every case.
ensure_private_dir() {
    local dir="$1" owner="${2:-$(id -un)}" uid
    uid="$(id -u "$owner")" || die "no such user: $owner"
    if [[ ! -e "$dir" && ! -L "$dir" ]]; then
        mkdir -p -- "$(dirname -- "$dir")"
        if mkdir -m 700 -- "$dir" 2>/dev/null && [[ "$uid" != "$(id -u)" ]]; then
            chown -- "$owner": "$dir"
        fi
    fi
    check_private_dir "$dir" "$uid"
}

# socket_dir DIR EXTRA [OWNER]: DIR, or a folder named after DIR's hash in OWNER's private scratch
# when DIR plus EXTRA characters of socket file name would not fit a UNIX socket path (108
# bytes, sun_path). Only names it; prepare_socket_dir creates it.
socket_dir() {
    local dir="$1" extra="$2" h
    if (( ${#dir} + extra + 1 <= 100 )); then
        echo "$dir"
    else
        h="$(printf '%s' "$dir" | sha256sum | cut -c1-16)"
        echo "$(scratch_dir "${3:-}")/$h"
    fi
}

# prepare_socket_dir SOCKDIR HOME [OWNER]: create SOCKDIR; when it is not HOME (socket_dir chose
# the scratch folder), first create or check OWNER's private scratch folder that holds it.
prepare_socket_dir() {
    local sock="$1" home="$2" owner="${3:-$(id -un)}"
    if [[ "$sock" != "$home" ]]; then
        ensure_private_dir "$(dirname -- "$sock")" "$owner"
    fi
    mkdir -p -- "$sock"
}

# lock_existing DIR: lock_component, but fail (without creating anything) when DIR does not
# exist, i.e. nothing was ever started from this state dir.
lock_existing() {
    [[ -d "$1" ]] || return 1
    lock_component "$1"
}

# Serialise start/stop of one component: lock_component DIR (holds fd 9 until the script exits).
lock_component() {
    secure_state_dir
    mkdir -p "$1"
    exec 9>"$1/.lock"
    flock -w 120 9 || die "another infra command holds $1/.lock for more than 120 s"
}
