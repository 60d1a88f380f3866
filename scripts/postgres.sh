#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the PostgreSQL test lane (`make test-postgres`).
#   scripts/postgres.sh start [PORT]   installs the server from Debian's packages if it is missing,
#                                      creates a cluster in a temp folder and starts it
#   scripts/postgres.sh stop           stops it and deletes the cluster
set -euo pipefail
STATE=/tmp/xray-test-postgres.dir
PORT=${2:-54329}

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_owner() {  # initdb and the server refuse to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    if [ -z "$(pg_bin)" ]; then
      if [ "$(id -u)" != 0 ]; then echo "PostgreSQL is not installed; install the postgresql package" >&2; exit 1; fi
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    fi
    BIN=$(pg_bin)
    DIR=$(mktemp -d /tmp/xray-pg.XXXXXX)
    chmod 755 "$DIR"
    if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
    as_owner "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -o "-h 127.0.0.1 -p $PORT -k $DIR" -l "$DIR/log" -w start >/dev/null
    echo "$DIR" > "$STATE"
    echo "PostgreSQL on 127.0.0.1:$PORT (cluster in $DIR)"
    ;;
  stop)
    [ -f "$STATE" ] || exit 0
    DIR=$(cat "$STATE")
    as_owner "$(pg_bin)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null || true
    rm -rf "$DIR" "$STATE"
    ;;
  *)
    echo "usage: scripts/postgres.sh start [PORT] | stop" >&2; exit 2 ;;
esac
