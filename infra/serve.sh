#!/usr/bin/env bash
# One command for the service: Prefect server + work pool + deployments + worker; and its undo.
set -euo pipefail
MONOLM_SCRIPT=serve
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/serve.sh COMMAND [--port N] [--db sqlite|postgres] [--host H] [--pool NAME] [--no-deploy]

Commands:
  up      start the Prefect server (infra/server/prefect-server.sh, PostgreSQL too with
          --db postgres), create the work pool, `prefect deploy --all`, start a worker
          (infra/worker.sh), and print the UI address. Records what it started; anything already
          running is reused and left alone by `down`. On failure it undoes what it started.
  down    stop exactly what `up` started, in reverse order (worker, then server, then
          PostgreSQL if the server start brought it up), by recorded PIDs
  status  status of server and worker
  nightly say how `up` deploys the nightly schedule (active only with MONOLM_NIGHTLY=on) and
          how to switch it on a running service

Options (up):
  --port N             server port (default: last used, else 4200, else a free port)
  --db sqlite|postgres server database (default sqlite)
  --host H             server bind address (default 127.0.0.1; see prefect-server.sh --help)
  --pool NAME          work pool (default local)
  --no-deploy          skip `prefect deploy --all`
  -h, --help           this help

The nightly deployment experiment/nightly-quick runs the `quick` preset (it downloads
Pythia-1.4B, several GB, and trains it) on cron MONOLM_NIGHTLY_CRON (default 0 2 * * *) in time
zone MONOLM_NIGHTLY_TZ (default UTC). `up` deploys its schedule INACTIVE unless MONOLM_NIGHTLY=on.

State: <state>/serve/started lists what `up` started (<state> = $MONOLM_STATE_DIR or <repo>/.state).
USAGE
}

STATE="$(monolm_state_dir)"
S_DIR="$STATE/serve"
STARTED="$S_DIR/started"
INFRA="$MONOLM_REPO_ROOT/infra"
SERVER="$INFRA/server/prefect-server.sh"
WORKER="$INFRA/worker.sh"

NEW=()   # what this `up` invocation started, in order

recorded() { [[ -s "$STARTED" ]] && grep -qxF "$1" "$STARTED"; }
record() { recorded "$1" || printf '%s\n' "$1" >>"$STARTED"; NEW+=("$1"); }

stop_entry() {
    case "$1" in
        worker:*) "$WORKER" stop --pool "${1#worker:}" ;;
        server) "$SERVER" stop ;;
        "") ;;
        *) log "ignoring unknown entry '$1' in $STARTED" ;;
    esac
}

cmd_down() {
    if [[ ! -s "$STARTED" ]]; then
        log "nothing was started by 'serve.sh up' (no $STARTED)"
        return 0
    fi
    local lines=() i status=0
    mapfile -t lines <"$STARTED"
    for (( i=${#lines[@]}-1; i>=0; i-- )); do
        stop_entry "${lines[$i]}" || status=1
    done
    [[ "$status" == 0 ]] || die "some components did not stop; see above ($STARTED kept)"
    rm -f "$STARTED"
    log "stopped everything 'up' started"
}

# On a failed `up`: stop what this invocation started, newest first, and forget it.
undo_new() {
    local i entry
    log "up failed; stopping what it started: ${NEW[*]:-nothing}"
    for (( i=${#NEW[@]}-1; i>=0; i-- )); do
        entry="${NEW[$i]}"
        stop_entry "$entry" || true
        if [[ -f "$STARTED" ]]; then
            grep -vxF "$entry" "$STARTED" >"$STARTED.tmp" || true
            mv -f "$STARTED.tmp" "$STARTED"
        fi
    done
}

cmd_up() {
    local port="$1" db="$2" pool="$3" deploy="$4" host="$5" url ui
    mkdir -p "$S_DIR"
    local server_args=() worker_args=(--pool "$pool")
    [[ -n "$port" ]] && server_args+=(--port "$port")
    [[ -n "$db" ]] && server_args+=(--db "$db")
    [[ -n "$host" ]] && server_args+=(--host "$host")
    [[ "$deploy" == 1 ]] || worker_args+=(--no-deploy)

    trap 'rc=$?; if [[ $rc != 0 ]]; then undo_new; fi' EXIT

    if "$SERVER" status >/dev/null 2>&1; then
        recorded server || log "Prefect server already running, not started by 'up': reusing it, 'down' leaves it alone"
    else
        record server
    fi
    "$SERVER" start "${server_args[@]}" >/dev/null
    url="$("$SERVER" url)"
    if "$WORKER" status --pool "$pool" >/dev/null 2>&1; then
        recorded "worker:$pool" || log "worker for pool '$pool' already running, not started by 'up': reusing it, 'down' leaves it alone"
    else
        record "worker:$pool"
    fi
    PREFECT_API_URL="$url" "$WORKER" start "${worker_args[@]}"
    trap - EXIT
    ui="${url%/api}"
    log "service up"
    cat <<EOF
Prefect UI:  $ui
API:         $url
Use it:      export PREFECT_API_URL=$url
             export PREFECT_API_AUTH_STRING="\$(cat $(monolm_state_dir)/prefect/auth)"
             .venv/bin/prefect deployment run experiment/seed-42 --param preset=tiny
UI login:    the UI asks for the auth string (the content of $(monolm_state_dir)/prefect/auth)
Run states:  make status
Stop it:     make stop
EOF
    if [[ "$deploy" == 1 ]]; then nightly_note; fi
}

# What `up` deploys for the nightly schedule (the same switch as prefect.yaml's build step).
nightly_note() {
    local when="cron '${MONOLM_NIGHTLY_CRON:-0 2 * * *}' ${MONOLM_NIGHTLY_TZ:-UTC}"
    if [[ "${MONOLM_NIGHTLY:-off}" == on ]]; then
        cat <<EOF
Nightly:     ACTIVE: experiment/nightly-quick runs the quick preset ($when); it downloads
             Pythia-1.4B (several GB) and trains it. Pause it: .venv/bin/prefect deployment schedule pause --all
EOF
    else
        cat <<EOF
Nightly:     inactive: experiment/nightly-quick ($when, quick preset, downloads Pythia-1.4B) is
             deployed paused. Switch it on: MONOLM_NIGHTLY=on make serve
             (or on this service: .venv/bin/prefect deployment schedule resume --all)
EOF
    fi
}

cmd_status() {
    local rc=0
    printf 'server: '; "$SERVER" status || rc=$?
    printf 'worker: '; "$WORKER" status || rc=$?
    [[ -s "$STARTED" ]] && printf 'started by up: %s\n' "$(tr '\n' ' ' <"$STARTED")"
    return "$rc"
}

main() {
    local cmd port="" db="" host="" pool=local deploy=1
    parse_command_line --port=port --db=db --host=host --pool=pool --no-deploy=deploy:0 -- "$@"
    case "$cmd" in
        -h|--help|help) usage ;;
        up) cmd_up "$port" "$db" "$pool" "$deploy" "$host" ;;
        down) cmd_down ;;
        status) cmd_status ;;
        nightly) nightly_note ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
