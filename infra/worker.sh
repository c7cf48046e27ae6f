#!/usr/bin/env bash
# Create the work pool, deploy prefect.yaml, and run a Prefect process worker in the background.
set -euo pipefail
MONOLM_SCRIPT=worker
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/worker.sh COMMAND [--pool NAME] [--name WORKER] [--no-deploy] [--timeout S] [--grace S]

A Prefect worker for the project's deployments, talking to $PREFECT_API_URL or, when that is
unset, to the server started by infra/server/prefect-server.sh (<state>/prefect/api_url).

Commands:
  start    1. create work pool NAME of type `process` if it does not exist, with the job
              template of infra/pool_template.py (no `command`/`env` job variables)
           2. `prefect deploy --all` from the repo root (reads prefect.yaml; skip: --no-deploy)
           3. start `prefect worker start --pool NAME` in the background (PID file + log) and
              wait until the server lists it ONLINE. Idempotent: a running worker is kept.
  stop     stop the worker this script started: SIGINT, then SIGTERM, then SIGKILL to the
           worker, its process group and every flow-run process it spawned (recorded PID;
           `prefect worker start` 3.8 ignores a first SIGTERM/SIGINT for 50 s and more)
  status   print whether it runs (exit 0 running, 3 stopped)

Options:
  --pool NAME    work pool (default: local)
  --name WORKER  worker name (default: monolm-<host>-<pool>)
  --no-deploy    do not run `prefect deploy --all`
  --timeout S    seconds to wait for the worker to come online (default 60)
  --grace S      seconds stop waits after SIGINT before escalating (default 10)
  -h, --help     this help

Files: <state>/worker/<pool>.pid, <state>/worker/<pool>.log, <state>/worker/deploy.log
(<state> = $MONOLM_STATE_DIR or <repo>/.state).
USAGE
}

STATE="$(monolm_state_dir)"
W_DIR="$STATE/worker"
API_URL_FILE="$STATE/prefect/api_url"

api_url() {
    if [[ -n "${PREFECT_API_URL:-}" ]]; then
        echo "$PREFECT_API_URL"
    elif [[ -s "$API_URL_FILE" ]]; then
        cat "$API_URL_FILE"
    else
        die "no Prefect API: set PREFECT_API_URL or start a server with infra/server/prefect-server.sh start"
    fi
}

api_healthy() { curl -fsS --max-time 5 "$1/health" 2>/dev/null | grep -q true; }

# Is worker NAME listed ONLINE in pool POOL?
worker_online() {
    local url="$1" pool="$2" name="$3"
    api_request POST "$url" "/work_pools/$pool/workers/filter" '{}' 2>/dev/null \
        | "$(monolm_python)" -c '
import json, sys
name = sys.argv[1]
workers = json.load(sys.stdin)
sys.exit(0 if any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers) else 1)
' "$name"
}

pool_exists() { api_request GET "$1" "/work_pools/$2" >/dev/null 2>&1; }

ensure_pool() {
    local prefect="$1" pool="$2" url="$3" template="$W_DIR/pool-template.json"
    # The pool's base job template has no `command`, `env` or `working_dir` variable and refuses
    # any other one: a flow run cannot choose what the worker executes (infra/pool_template.py).
    (cd "$MONOLM_REPO_ROOT" && "$(monolm_python)" -m infra.pool_template) >"$template" 9>&- \
        || die "could not write the work pool's job template"
    if pool_exists "$url" "$pool"; then
        log "work pool '$pool' exists; setting its job template"
        "$prefect" work-pool update "$pool" --base-job-template "$template" >"$W_DIR/pool.log" 2>&1 9>&- \
            || { log_tail "$W_DIR/pool.log"; die "could not set the job template of work pool '$pool'"; }
        return 0
    fi
    log "creating work pool '$pool' (type process)"
    if ! "$prefect" work-pool create "$pool" --type process --base-job-template "$template" >"$W_DIR/pool.log" 2>&1 9>&-; then
        # Another process may have created it in between.
        pool_exists "$url" "$pool" || { log_tail "$W_DIR/pool.log"; die "could not create work pool '$pool'"; }
        "$prefect" work-pool update "$pool" --base-job-template "$template" >"$W_DIR/pool.log" 2>&1 9>&- \
            || { log_tail "$W_DIR/pool.log"; die "could not set the job template of work pool '$pool'"; }
    fi
}

deploy_all() {
    local prefect="$1"
    [[ -f "$MONOLM_REPO_ROOT/prefect.yaml" ]] \
        || die "$MONOLM_REPO_ROOT/prefect.yaml does not exist, so there is nothing to deploy; pass --no-deploy to start the worker anyway"
    log "prefect deploy --all (from $MONOLM_REPO_ROOT; log $W_DIR/deploy.log)"
    local t0; t0="$(now_ms)"
    if ! (cd "$MONOLM_REPO_ROOT" && PREFECT_CLI_PROMPT=false "$prefect" --no-prompt deploy --all) \
            >"$W_DIR/deploy.log" 2>&1 9>&-; then
        log_tail "$W_DIR/deploy.log" 60
        die "prefect deploy --all failed (log: $W_DIR/deploy.log)"
    fi
    log "deployed in $(( ($(now_ms) - t0) / 1000 )) s"
}

cmd_start() {
    local pool="$1" name="$2" deploy="$3" timeout="$4"
    mkdir -p "$W_DIR"
    local pid_file="$W_DIR/$pool.pid" log_file="$W_DIR/$pool.log" url pid prefect t0
    lock_component "$W_DIR"
    url="$(api_url)"
    monolm_api_auth "$url"
    api_healthy "$url" || die "the Prefect API at $url does not answer /health; start the server first (infra/server/prefect-server.sh start)"
    prefect="$(monolm_prefect)"
    export PREFECT_API_URL="$url"
    # The auth string, in the environment that the worker, its flow runs and their SLURM jobs inherit.
    monolm_api_auth "$url"
    # Flow runs inherit this: results and local storage stay inside the project's state dir.
    export PREFECT_HOME="${PREFECT_HOME:-$STATE/prefect}"
    export MONOLM_STATE_DIR="$STATE"
    ensure_pool "$prefect" "$pool" "$url"
    if [[ "$deploy" == 1 ]]; then deploy_all "$prefect"; fi
    if pid="$(pid_alive "$pid_file")"; then
        log "worker already running (pid $pid, pool $pool)"
        return 0
    fi
    pid_clear "$pid_file"
    # A worker of the same name that stopped recently is still listed ONLINE until its heartbeat
    # expires; forget it so that "ONLINE" below means *this* worker registered.
    api_request DELETE "$url" "/work_pools/$pool/workers/$name" >/dev/null 2>&1 || true
    t0="$(now_ms)"
    printf '\n===== %s: prefect worker start --pool %s --name %s\n' "$(date -Is)" "$pool" "$name" >>"$log_file"
    pid="$(cd "$MONOLM_REPO_ROOT" && start_group "$pid_file" "$log_file" \
        "$prefect" worker start --pool "$pool" --name "$name" --type process --install-policy never)"
    if ! wait_for "$timeout" "$pid" "worker $name" worker_online "$url" "$pool" "$name"; then
        log_tail "$log_file"
        stop_recorded "$pid_file" "worker $name" INT:2 KILL:5 || true
        die "the worker did not come online (log: $log_file)"
    fi
    log "worker '$name' online in $(( ($(now_ms) - t0) / 1000 )) s: pid $pid, pool $pool, API $url, log $log_file"
}

cmd_stop() {
    local pool="$1" grace="$2"
    lock_existing "$W_DIR" || { log "worker (pool $pool) is not running (nothing under $W_DIR)"; return 0; }
    # SIGINT reaches the worker and its flow-run processes (which run in their own sessions):
    # a flow run interrupted this way reports itself Crashed to the server, where a SIGKILL
    # would leave it Running forever. The worker itself does not exit on a first SIGINT or
    # SIGTERM (prefect 3.8: it forwards the signal to itself and keeps running), so once its
    # flow runs are gone (or after --grace s) a second signal makes prefect SIGKILL the worker;
    # SIGKILL on the recorded tree is the last resort.
    stop_recorded "$W_DIR/$pool.pid" "worker (pool $pool)" "INT:$grace:children" TERM:5 KILL:5
}

cmd_status() {
    local pool="$1" pid
    if pid="$(pid_alive "$W_DIR/$pool.pid")"; then
        echo "running: pid $pid, pool $pool, log $W_DIR/$pool.log"
        return 0
    fi
    echo "stopped (pool $pool)"
    return 3
}

main() {
    local cmd pool=local name="" deploy=1 timeout=60 grace=10
    parse_command_line --pool=pool --name=name --no-deploy=deploy:0 --timeout=timeout --grace=grace -- "$@"
    [[ "$pool" =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid pool name: $pool"
    [[ -n "$name" ]] || name="monolm-$(hostname -s 2>/dev/null || echo host)-$pool"
    case "$cmd" in
        -h|--help|help) usage ;;
        start) command -v curl >/dev/null || die "curl is needed (apt-get install -y curl)"
               cmd_start "$pool" "$name" "$deploy" "$timeout" ;;
        stop) cmd_stop "$pool" "$grace" ;;
        status) cmd_status "$pool" ;;
        *) usage >&2; die "unknown command: $cmd" ;;
    esac
}

main "$@"
