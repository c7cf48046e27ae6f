#!/usr/bin/env bash
# Start/stop a Prefect server on loopback with a project-local PREFECT_HOME; SQLite by default,
# PostgreSQL (infra/postgres/postgres.sh) with --db postgres.
set -euo pipefail
MONOLM_SCRIPT="prefect-server"
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/server/prefect-server.sh COMMAND [--port N] [--db sqlite|postgres] [--host H] [--timeout S]

A Prefect server bound to 127.0.0.1 (by default) with PREFECT_HOME=<state>/prefect and analytics
off.

Commands:
  start    start the server (idempotent: a running server is reused when port and database
           match), wait until http://127.0.0.1:N/api/health answers, and write the API URL to
           <state>/prefect/api_url
  stop     stop the server this script started (recorded process group); also stops PostgreSQL
           when `start` had to start it
  status   print whether it runs, its URLs and database (exit 0 running, 3 stopped)
  url      print the API URL (http://127.0.0.1:N/api); use as
             export PREFECT_API_URL=$(infra/server/prefect-server.sh url)

Options:
  --port N             TCP port (default: the last one used, else 4200, else a free port)
  --db sqlite|postgres database (default: the running server's, else sqlite in
                       <state>/prefect/prefect.db). postgres starts
                       infra/postgres/postgres.sh if needed and sets
                       PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...
  --host H             address to bind (default 127.0.0.1). A cluster whose compute nodes must
                       reach the API needs e.g. 0.0.0.0 (refused with MONOLM_API_AUTH=off)
  --timeout S          seconds to wait for /api/health (default 120)
  -h, --help           this help

Authentication: the API requires the auth string in <state>/prefect/auth (generated on the
first start, mode 600, `monolm:<random hex>`); clients send it from the environment
(PREFECT_API_AUTH_STRING, which the infra scripts, `monolm runs` and the worker set from that
file). CSRF protection is on and CORS admits only the UI's own origin. MONOLM_API_AUTH=off
starts a server without authentication, on loopback only (a non-loopback --host is refused).

Files under <state>/prefect (<state> = $MONOLM_STATE_DIR or <repo>/.state): server.pid,
server.log, api_url, port, db, host, auth.
USAGE
}

STATE="$(monolm_state_dir)"
HOME_DIR="$STATE/prefect"
PID_FILE="$HOME_DIR/server.pid"
LOG_FILE="$HOME_DIR/server.log"
API_URL_FILE="$HOME_DIR/api_url"
PORT_FILE="$HOME_DIR/port"
DB_FILE="$HOME_DIR/db"
HOST_FILE="$HOME_DIR/host"
OWNS_PG_FILE="$HOME_DIR/started_postgres"
AUTH_FILE="$HOME_DIR/auth"
PG_SCRIPT="$MONOLM_REPO_ROOT/infra/postgres/postgres.sh"

# Where to reach a server bound to HOST from this machine, and the URL to give to others.
local_addr() { case "$1" in 0.0.0.0|::|"[::]") echo 127.0.0.1 ;; *) echo "$1" ;; esac; }
public_addr() { case "$1" in 0.0.0.0|::|"[::]") hostname -f 2>/dev/null || hostname ;; *) echo "$1" ;; esac; }
running_host() { cat "$HOST_FILE" 2>/dev/null || echo 127.0.0.1; }
is_loopback() { case "$1" in 127.*|localhost|::1) return 0 ;; *) return 1 ;; esac; }

# The origins the UI is served from (the server itself): the only ones CORS admits.
ui_origins() {
    local host="$1" port="$2" out="http://127.0.0.1:$2,http://localhost:$2"
    is_loopback "$host" || out+=",http://$(public_addr "$host"):$port"
    echo "$out"
}

# The API auth string `monolm:<hex>`: generated once (mode 600, never printed), kept across
# restarts so running workers and SLURM jobs keep working.
ensure_auth() {
    ensure_secret "$AUTH_FILE" monolm: "the API auth string"
    [[ "$(<"$AUTH_FILE")" =~ ^monolm:[0-9a-f]{48}$ ]] \
        || die "$AUTH_FILE does not hold a generated auth string; delete it and run start again"
}

# health PORT [HOST]
health() {
    curl -fsS --max-time 2 "http://$(local_addr "${2:-127.0.0.1}"):$1/api/health" 2>/dev/null | grep -q true
}

choose_port() {
    local port
    if [[ -s "$PORT_FILE" ]] && ! port_in_use "$(<"$PORT_FILE")"; then
        port="$(<"$PORT_FILE")"
    elif ! port_in_use 4200; then
        port=4200
    else
        port="$(free_port)"
        log "port 4200 is taken; using free port $port"
    fi
    echo "$port"
}

cmd_start() {
    local port="$1" db="$2" timeout="$3" host="$4" pid t0 elapsed db_url api
    case "$db" in ""|sqlite|postgres) ;; *) die "--db must be sqlite or postgres, not '$db'" ;; esac
    lock_component "$HOME_DIR"
    # The database and logs are this user's (a PREFECT_HOME from before umask 077 was not).
    chmod go-rwx "$HOME_DIR" "$HOME_DIR"/prefect.db* "$HOME_DIR"/*.log 2>/dev/null || true
    if pid="$(pid_alive "$PID_FILE")"; then
        local run_port run_db run_host
        run_port="$(<"$PORT_FILE")"; run_db="$(cat "$DB_FILE" 2>/dev/null || echo sqlite)"
        run_host="$(running_host)"
        [[ -z "$port" || "$port" == "$run_port" ]] \
            || die "already running on port $run_port (pid $pid); stop it first to use port $port"
        [[ -z "$db" || "$db" == "$run_db" ]] \
            || die "already running with --db $run_db (pid $pid); stop it first to switch to $db"
        [[ -z "$host" || "$host" == "$run_host" ]] \
            || die "already running on host $run_host (pid $pid); stop it first to bind $host"
        wait_for "$timeout" "$pid" "Prefect server" health "$run_port" "$run_host" \
            || { log_tail "$LOG_FILE"; die "the recorded server (pid $pid) does not answer on port $run_port"; }
        log "already running: pid $pid, UI http://$(public_addr "$run_host"):$run_port"
        cat "$API_URL_FILE"
        return 0
    fi
    pid_clear "$PID_FILE"
    rm -f "$API_URL_FILE"
    [[ -n "$db" ]] || db=sqlite
    [[ -n "$host" ]] || host=127.0.0.1
    if [[ "${MONOLM_API_AUTH:-on}" == off ]]; then
        is_loopback "$host" || die "refusing to bind $host without authentication (MONOLM_API_AUTH=off): anyone who reaches it would control this server; bind 127.0.0.1 or leave authentication on"
        log "WARNING: MONOLM_API_AUTH=off: the API has no authentication (loopback only)"
    else
        ensure_auth
        is_loopback "$host" || log "binding $host: the API needs the auth string, but travels as plain HTTP; keep it on the cluster's private network"
    fi
    [[ -n "$port" ]] || port="$(choose_port)"
    [[ "$port" =~ ^[0-9]+$ ]] || die "invalid port: $port"
    port_in_use "$port" && die "port $port is already in use by another process; pass --port N (a free one: infra/free-port.sh)"
    local prefect; prefect="$(monolm_prefect)"

    # The server's environment: only what we set here decides where its data goes.
    export PREFECT_HOME="$HOME_DIR"
    export PREFECT_SERVER_ANALYTICS_ENABLED=false
    export PREFECT_SERVER_API_HOST="$host"
    export PREFECT_SERVER_API_PORT="$port"
    unset PREFECT_API_URL PREFECT_API_KEY PREFECT_API_AUTH_STRING PREFECT_SERVER_API_AUTH_STRING
    if [[ "${MONOLM_API_AUTH:-on}" != off ]]; then
        # In the server's environment, never on its command line (other users read process lists).
        PREFECT_SERVER_API_AUTH_STRING="$(<"$AUTH_FILE")"
        export PREFECT_SERVER_API_AUTH_STRING
    fi
    # CSRF tokens for every state-changing request; cross-origin requests only from the UI itself.
    export PREFECT_SERVER_CSRF_PROTECTION_ENABLED=true
    PREFECT_SERVER_CORS_ALLOWED_ORIGINS="$(ui_origins "$host" "$port")"
    export PREFECT_SERVER_CORS_ALLOWED_ORIGINS
    rm -f "$OWNS_PG_FILE"
    if [[ "$db" == postgres ]]; then
        if ! "$PG_SCRIPT" status >/dev/null 2>&1; then
            "$PG_SCRIPT" start
            : >"$OWNS_PG_FILE"   # we started it, so `stop` stops it too
        fi
        db_url="$("$PG_SCRIPT" url)"
    else
        db_url="sqlite+aiosqlite:///$HOME_DIR/prefect.db"
    fi
    export PREFECT_API_DATABASE_CONNECTION_URL="$db_url"

    t0="$(now_ms)"
    {
        printf '\n===== %s: prefect server start --host %s --port %s (db %s)\n' "$(date -Is)" "$host" "$port" "$db"
    } >>"$LOG_FILE"
    pid="$(start_group "$PID_FILE" "$LOG_FILE" "$prefect" server start --host "$host" --port "$port" --analytics-off)"
    printf '%s\n' "$port" >"$PORT_FILE"
    printf '%s\n' "$db" >"$DB_FILE"
    printf '%s\n' "$host" >"$HOST_FILE"
    if ! wait_for "$timeout" "$pid" "Prefect server" health "$port" "$host"; then
        log_tail "$LOG_FILE"
        stop_recorded "$PID_FILE" "Prefect server" TERM:10 KILL:5 || true
        die "the Prefect server did not become healthy on $host:$port (log: $LOG_FILE)"
    fi
    elapsed=$(( $(now_ms) - t0 ))
    api="http://$(public_addr "$host"):$port/api"
    printf '%s\n' "$api" >"$API_URL_FILE.tmp" && mv -f "$API_URL_FILE.tmp" "$API_URL_FILE"
    log "Prefect server ready in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000))) s: pid $pid, db $db, UI ${api%/api}"
    log "use it with: export PREFECT_API_URL=\$(cat $API_URL_FILE)"
    echo "$api"
}

cmd_stop() {
    lock_existing "$HOME_DIR" || { log "Prefect server is not running (nothing under $HOME_DIR)"; return 0; }
    # uvicorn shuts down cleanly on SIGTERM; the group kill catches anything it leaves behind.
    stop_recorded "$PID_FILE" "Prefect server" TERM:20 KILL:5
    rm -f "$API_URL_FILE"
    if [[ -e "$OWNS_PG_FILE" ]]; then
        "$PG_SCRIPT" stop
        rm -f "$OWNS_PG_FILE"
    fi
}

cmd_status() {
    local pid port db host
    if pid="$(pid_alive "$PID_FILE")"; then
        port="$(<"$PORT_FILE")"; db="$(cat "$DB_FILE" 2>/dev/null || echo sqlite)"; host="$(running_host)"
        if health "$port" "$host"; then
            echo "running: pid $pid, db $db, host $host, UI http://$(public_addr "$host"):$port, API $(cat "$API_URL_FILE")"
        else
            echo "starting or unhealthy: pid $pid, port $port, db $db (log: $LOG_FILE)"
        fi
        return 0
    fi
    echo "stopped"
    return 3
}

cmd_url() {
    [[ -s "$API_URL_FILE" ]] && pid_alive "$PID_FILE" >/dev/null \
        || die "no Prefect server is running from $HOME_DIR: run 'infra/server/prefect-server.sh start'"
    cat "$API_URL_FILE"
}

main() {
    local cmd port="" db="" host="" timeout=120
    parse_command_line --port=port --db=db --host=host --timeout=timeout -- "$@"
    command -v curl >/dev/null || die "curl is needed for the health check (apt-get install -y curl)"
    case "$cmd" in
        -h|--help|help) usage ;;
        start) cmd_start "$port" "$db" "$timeout" "$host" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        url) cmd_url ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
