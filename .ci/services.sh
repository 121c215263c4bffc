#!/usr/bin/env bash
# Private Redis and PostgreSQL 15 servers for the gateway tests, on free loopback ports, in one temp folder.
#
#   eval "$(.ci/services.sh start)"   # starts both, prints the exports (THINKGATE_TEST_POSTGRES_URL, ...)
#   pytest tests/gateway
#   .ci/services.sh stop               # stops both and removes the folder (reads THINKGATE_SERVICES_DIR)
#
# .ci/run sources this file and calls thinkgate_services_start / thinkgate_services_stop (one implementation).
# Redis: Debian's redis-server (installed with apt-get when missing and we are root), no persistence.
# PostgreSQL: initdb/pg_ctl/postgres from PATH, trust auth, 127.0.0.1 only, fsync off, database thinkgate_test.
# PostgreSQL refuses to run as root: as root the cluster belongs to the unprivileged user thinkgate-ci
# (created if absent; `nobody` where useradd is missing); otherwise to the current user.

_tg_log() { echo "services: $*" >&2; }

_tg_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_tg_ensure_redis() {
  command -v redis-server >/dev/null && return 0
  if [ "$(id -u)" != 0 ]; then
    _tg_log "redis-server is missing and we are not root: apt-get install redis-server"
    return 1
  fi
  _tg_log "installing redis-server (Debian package)"
  local log
  log=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >"$log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1 || true
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >>"$log" 2>&1; then
      cat "$log" >&2
      rm -f "$log"
      return 1
    fi
  fi
  rm -f "$log"
}

_tg_pg_user() {
  # The unprivileged owner of the cluster (see the header).
  if [ "$(id -u)" != 0 ]; then
    id -un
  elif id thinkgate-ci >/dev/null 2>&1; then
    echo thinkgate-ci
  elif command -v useradd >/dev/null && useradd --system --no-create-home --shell /usr/sbin/nologin thinkgate-ci; then
    echo thinkgate-ci
  else
    echo nobody
  fi
}

_tg_as() {
  # _tg_as USER CMD...: run CMD as USER (directly when that is us).
  local user=$1
  shift
  if [ "$user" = "$(id -un)" ]; then "$@"; else runuser -u "$user" -- "$@"; fi
}

thinkgate_services_start() {
  local dir redis_port pg_port pg_user i tool
  _tg_ensure_redis || return 1
  for tool in initdb pg_ctl postgres; do
    command -v "$tool" >/dev/null || { _tg_log "$tool is not on PATH (PostgreSQL 15 server binaries)"; return 1; }
  done
  dir=$(mktemp -d "${TMPDIR:-/tmp}/thinkgate-services.XXXXXX") || return 1
  export THINKGATE_SERVICES_DIR=$dir

  redis_port=$(_tg_free_port)
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" || { thinkgate_services_stop; return 1; }
  for i in $(seq 100); do
    [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.05
  done
  [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = PONG ] \
    || { _tg_log "redis-server did not start: $(tail -5 "$dir/redis.log")"; thinkgate_services_stop; return 1; }

  pg_user=$(_tg_pg_user)
  pg_port=$(_tg_free_port)
  if ! { mkdir "$dir/pg" && chown "$pg_user" "$dir/pg" && chmod 700 "$dir/pg" && chmod 755 "$dir"; }; then
    thinkgate_services_stop
    return 1
  fi
  if ! _tg_as "$pg_user" initdb -D "$dir/pg/data" -U thinkgate --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    thinkgate_services_stop
    return 1
  fi
  if ! _tg_as "$pg_user" pg_ctl -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 -o \
      "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$dir/pg -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
      start >/dev/null; then
    cat "$dir/pg/postgres.log" >&2
    thinkgate_services_stop
    return 1
  fi
  echo "$pg_user" >"$dir/pg_user"
  # createdb sits next to pg_ctl (Debian keeps the server binaries in /usr/lib/postgresql/15/bin).
  local bindir
  bindir=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
  if ! "$bindir/createdb" -h 127.0.0.1 -p "$pg_port" -U thinkgate thinkgate_test; then
    thinkgate_services_stop
    return 1
  fi

  export THINKGATE_TEST_POSTGRES_URL="postgresql+psycopg://thinkgate@127.0.0.1:$pg_port/thinkgate_test"
  export THINKGATE_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
  _tg_log "redis on 127.0.0.1:$redis_port, postgresql on 127.0.0.1:$pg_port (user $pg_user), in $dir"
}

thinkgate_services_exports() {
  printf 'export THINKGATE_SERVICES_DIR=%q\n' "$THINKGATE_SERVICES_DIR"
  printf 'export THINKGATE_TEST_POSTGRES_URL=%q\n' "$THINKGATE_TEST_POSTGRES_URL"
  printf 'export THINKGATE_TEST_REDIS_URL=%q\n' "$THINKGATE_TEST_REDIS_URL"
}

thinkgate_services_stop() {
  local dir=${1:-${THINKGATE_SERVICES_DIR:-}}
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  if [ -f "$dir/pg/data/postmaster.pid" ]; then
    _tg_as "$(cat "$dir/pg_user" 2>/dev/null || stat -c %U "$dir/pg")" pg_ctl -D "$dir/pg/data" -m immediate -w stop \
      >/dev/null 2>&1 || true
  fi
  if [ -f "$dir/redis.pid" ]; then
    local pid
    pid=$(cat "$dir/redis.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  fi
  rm -rf "$dir"
  unset THINKGATE_SERVICES_DIR THINKGATE_TEST_POSTGRES_URL THINKGATE_TEST_REDIS_URL
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    start) thinkgate_services_start && thinkgate_services_exports ;;
    stop) thinkgate_services_stop "${2:-}" ;;
    *) echo "usage: $0 start|stop [DIR]   (eval \"\$($0 start)\" sets the test URLs)" >&2; exit 2 ;;
  esac
fi
