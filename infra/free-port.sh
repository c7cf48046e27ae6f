#!/usr/bin/env bash
# Print a TCP port that is free on 127.0.0.1 (chosen by the kernel), e.g. for a test server.
set -euo pipefail
MONOLM_SCRIPT=free-port
# shellcheck source=infra/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
    cat <<'USAGE'
Usage: infra/free-port.sh [--help]

Prints one TCP port number that is free on 127.0.0.1 right now (the kernel picks it by binding
port 0). There is an unavoidable window between printing and use; callers that start a server
should still check that the server came up.

Example:
  port=$(infra/free-port.sh); infra/server/prefect-server.sh start --port "$port"
USAGE
}

case "${1:-}" in
    -h|--help|help) usage; exit 0 ;;
    "") free_port ;;
    *) usage >&2; die "unexpected argument: $1" ;;
esac
