#!/usr/bin/env bash
# A project-local PostgreSQL for the Prefect server: Debian's postgresql, one cluster under the
# state dir, listening on 127.0.0.1 only, a generated password that never enters the repo.
set -euo pipefail
MONOLM_SCRIPT=postgres
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/postgres/postgres.sh COMMAND [--port N] [--timeout S]

A project-local PostgreSQL cluster for the Prefect server (Debian's `postgresql` package).

Commands:
  install   apt-get install postgresql if initdb/pg_ctl are missing (needs root)
  start     install if needed, initdb a cluster under <state>/postgres/data on first use, start it
            on 127.0.0.1 (only), and make sure role + database `prefect` and the pg_trgm
            extension exist. Idempotent: does nothing but re-check when already running.
  stop      stop the cluster this script started (recorded postmaster PID)
  status    print whether it runs (exit 0 running, 3 stopped)
  url       print postgresql+asyncpg://prefect:<password>@127.0.0.1:<port>/prefect

Options:
  --port N     TCP port (first start: a free port; later: the recorded one)
  --timeout S  seconds to wait for start-up (default 60)
  -h, --help   this help

State (<state> = $MONOLM_STATE_DIR or <repo>/.state):
  <state>/postgres/data       the cluster (owned by the `postgres` system user when run as root,
                              because PostgreSQL refuses to run as root)
  <state>/postgres/password   generated password of role `prefect` (mode 600)
  <state>/postgres/port       the port, <state>/postgres/postgres.pid the postmaster PID
  <state>/postgres/log/       server log

Environment: PG_BINDIR overrides the directory of initdb/pg_ctl/postgres
(default: newest /usr/lib/postgresql/<version>/bin).
USAGE
}

STATE="$(monolm_state_dir)"
PG_DIR="$STATE/postgres"
DATA="$PG_DIR/data"
# The socket .s.PGSQL.<port> must fit a UNIX socket path: long state paths use a folder in the
# cluster owner's private scratch (/tmp/monolm-<uid>, 0700, checked: lib.sh socket_dir).
pg_owner() { if [[ "$(id -u)" == 0 ]] && id postgres >/dev/null 2>&1; then echo postgres; else id -un; fi; }
RUN_DIR="$(socket_dir "$PG_DIR/run" 16 "$(pg_owner)")"
LOG_DIR="$PG_DIR/log"
PW_FILE="$PG_DIR/password"
PORT_FILE="$PG_DIR/port"
PID_FILE="$PG_DIR/postgres.pid"
DB_NAME=prefect
DB_USER=prefect

find_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        [[ -x "$PG_BINDIR/pg_ctl" ]] && { echo "$PG_BINDIR"; return 0; }
        return 1
    fi
    local d best
    # Highest major version wins (numeric sort on the <version> path component).
    best="$(for d in /usr/lib/postgresql/*/bin; do
                [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && echo "$d"
            done | sort -t/ -k5,5n | tail -n 1)"
    [[ -n "$best" ]] && { echo "$best"; return 0; }
    return 1
}

cmd_install() {
    if BINDIR="$(find_bindir)"; then
        log "PostgreSQL binaries present in $BINDIR"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "PostgreSQL is not installed and installing needs root: run 'sudo apt-get install -y postgresql' (Debian/Ubuntu) or set PG_BINDIR"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and apt-get is not available: install PostgreSQL and set PG_BINDIR"
    log "installing Debian's postgresql (apt-get update && apt-get install -y postgresql)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    BINDIR="$(find_bindir)" || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/pg_ctl was found"
    log "PostgreSQL installed in $BINDIR"
}

# Run a command as the cluster owner: the `postgres` system user when we are root.
as_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

owner_name() {
    if [[ "$(id -u)" == 0 ]]; then echo postgres; else id -un; fi
}

prepare_dirs() {
    RUN_DIR="$(socket_dir "$PG_DIR/run" 16 "$(owner_name)")"  # `postgres` may exist only now
    mkdir -p "$PG_DIR" "$LOG_DIR"
    prepare_socket_dir "$RUN_DIR" "$PG_DIR/run" "$(owner_name)"
    chmod 700 "$PG_DIR"
    if [[ "$(id -u)" == 0 ]]; then
        chmod 711 "$PG_DIR"  # the `postgres` user searches it to reach data/, run/, log/
        id postgres >/dev/null 2>&1 || die "the 'postgres' system user does not exist (it comes with Debian's postgresql package)"
        chown postgres: "$RUN_DIR" "$LOG_DIR"
        # The state dir is 700 (lib.sh umask): the `postgres` user may search it (not list it)
        # to reach its folder; everything else in it stays 600/700.
        if [[ -O "$STATE" ]]; then chmod o+x "$STATE"; fi
        [[ -d "$DATA" ]] && chown postgres: "$DATA"
        # PostgreSQL runs as `postgres` and must be able to reach its data directory.
        runuser -u postgres -- test -x "$PG_DIR" \
            || die "user 'postgres' cannot traverse $PG_DIR (a parent directory is not world-searchable); set MONOLM_STATE_DIR to a directory it can reach, e.g. /var/tmp/monolm-state"
    fi
}

ensure_password() {
    ensure_secret "$PW_FILE" "" "a password for role '$DB_USER'"
}

init_cluster() {
    if [[ -s "$DATA/PG_VERSION" ]]; then
        return 0
    fi
    [[ ! -e "$DATA" ]] || [[ -z "$(ls -A "$DATA" 2>/dev/null)" ]] \
        || die "$DATA exists but is not a PostgreSQL cluster (no PG_VERSION); move it away"
    mkdir -p "$DATA"
    [[ "$(id -u)" == 0 ]] && chown postgres: "$DATA"
    chmod 700 "$DATA"
    log "initialising a cluster in $DATA (owner $(owner_name))"
    # peer for local socket connections (the owner administers without a password),
    # scram-sha-256 for TCP (role `prefect` with its generated password).
    as_owner "$BINDIR/initdb" -D "$DATA" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 --username="$(owner_name)" >"$LOG_DIR/initdb.log" 2>&1 \
        || { log_tail "$LOG_DIR/initdb.log"; die "initdb failed"; }
    printf "\n# monolm: listen address, port and socket directory (rewritten on every start)\ninclude_if_exists = 'monolm.conf'\n" \
        | as_owner tee -a "$DATA/postgresql.conf" >/dev/null
}

write_settings() {
    local port="$1"
    as_owner tee "$DATA/monolm.conf" >/dev/null <<EOF
# Written by infra/postgres/postgres.sh on every start; edits are overwritten.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$RUN_DIR'
password_encryption = 'scram-sha-256'
EOF
}

choose_port() {
    local requested="$1" port
    if [[ -n "$requested" ]]; then
        port="$requested"
    elif [[ -s "$PORT_FILE" ]]; then
        port="$(<"$PORT_FILE")"
    else
        port="$(free_port)"
    fi
    [[ "$port" =~ ^[0-9]+$ ]] || die "invalid port: $port"
    echo "$port"
}

psql_admin() {
    local port="$1"; shift
    as_owner env PGOPTIONS='-c client_min_messages=warning' "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$RUN_DIR" -p "$port" -U "$(owner_name)" "$@"
}

provision() {
    local port="$1" pw
    pw="$(<"$PW_FILE")"
    [[ "$pw" =~ ^[0-9a-f]+$ ]] || die "$PW_FILE does not hold a generated hex password; delete it and run start again"
    # SQL on stdin, so the password never appears in a process list.
    psql_admin "$port" -d postgres >/dev/null <<SQL
SELECT 'CREATE ROLE $DB_USER LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER')\gexec
ALTER ROLE $DB_USER WITH LOGIN PASSWORD '$pw';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
\c $DB_NAME
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
}

is_running() { pid_alive "$PID_FILE" >/dev/null; }

cmd_start() {
    local requested_port="$1" timeout="$2" port pid t0
    lock_component "$PG_DIR"
    if is_running; then
        port="$(<"$PORT_FILE")"
        [[ -z "$requested_port" || "$requested_port" == "$port" ]] \
            || die "already running on port $port; stop it first to change the port"
        BINDIR="$(find_bindir)" || die "PostgreSQL binaries not found"
        provision "$port"
        log "already running (pid $(<"$PID_FILE"), 127.0.0.1:$port)"
        return 0
    fi
    cmd_install
    prepare_dirs
    ensure_password
    init_cluster
    port="$(choose_port "$requested_port")"
    if port_in_use "$port"; then
        die "port $port is already in use by another process; pass --port N (a free one: infra/free-port.sh)"
    fi
    write_settings "$port"
    printf '%s\n' "$port" >"$PORT_FILE"
    t0="$(now_ms)"
    # pg_ctl daemonises the postmaster; -w waits until it accepts connections. fd 9 (our lock)
    # must not leak into the server.
    as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG_DIR/postgres.log" -w -t "$timeout" start \
        >"$LOG_DIR/pg_ctl.log" 2>&1 9>&- \
        || { log_tail "$LOG_DIR/postgres.log"; die "PostgreSQL did not start (see $LOG_DIR/postgres.log)"; }
    pid="$(head -n 1 "$DATA/postmaster.pid")"
    pid_write "$PID_FILE" "$pid"
    provision "$port"
    log "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') running: pid $pid, 127.0.0.1:$port, ready in $(( $(now_ms) - t0 )) ms"
}

cmd_stop() {
    lock_existing "$PG_DIR" || { log "not running (nothing under $PG_DIR)"; return 0; }
    local pid
    if ! pid="$(pid_alive "$PID_FILE")"; then
        pid_clear "$PID_FILE"
        log "not running"
        return 0
    fi
    BINDIR="$(find_bindir)" || die "PostgreSQL binaries not found"
    local pm_pid=""
    [[ -s "$DATA/postmaster.pid" ]] && pm_pid="$(head -n 1 "$DATA/postmaster.pid")"
    if [[ "$pm_pid" == "$pid" ]]; then
        # pg_ctl signals exactly the postmaster PID we recorded; fast = roll back open
        # transactions and shut down cleanly.
        as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >"$LOG_DIR/pg_ctl.log" 2>&1 9>&- || true
    fi
    if [[ "$RUN_DIR" != "$PG_DIR/run" ]]; then rmdir "$RUN_DIR" 2>/dev/null || true; fi
    if pid_alive "$PID_FILE" >/dev/null; then
        # pg_ctl did not stop it: signal the recorded postmaster (it takes its children along).
        stop_recorded "$PID_FILE" "PostgreSQL" TERM:30 QUIT:10 KILL:5
    else
        pid_clear "$PID_FILE"
        log "PostgreSQL stopped (pid $pid)"
    fi
}

cmd_status() {
    local pid
    if pid="$(pid_alive "$PID_FILE")"; then
        echo "running: pid $pid, 127.0.0.1:$(<"$PORT_FILE"), data $DATA"
        return 0
    fi
    echo "stopped (data $DATA)"
    return 3
}

cmd_url() {
    [[ -s "$PW_FILE" && -s "$PORT_FILE" ]] \
        || die "no cluster set up yet under $PG_DIR: run 'infra/postgres/postgres.sh start' first"
    printf 'postgresql+asyncpg://%s:%s@127.0.0.1:%s/%s\n' "$DB_USER" "$(<"$PW_FILE")" "$(<"$PORT_FILE")" "$DB_NAME"
}

main() {
    local cmd port="" timeout=60
    parse_command_line --port=port --timeout=timeout -- "$@"
    case "$cmd" in
        -h|--help|help) usage ;;
        install) cmd_install ;;
        start) cmd_start "$port" "$timeout" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        url) cmd_url ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
