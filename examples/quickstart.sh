#!/usr/bin/env bash
# Quick start: build legate, run it on routes/default, send real traffic through
# it (to its own admin server), show the metrics that counted it, then stop it
# with SIGTERM the way Kubernetes would. Exits non-zero if anything fails.
#   bash examples/quickstart.sh
# LEGATE_BIN=path skips the build (CI uses the debug binary).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${LEGATE_BIN:-}" ]; then
  cargo build --release --quiet
  LEGATE_BIN=target/release/legate
fi
ADMIN=${LEGATE_DEMO_ADMIN:-127.0.0.1:9901}
LISTEN=${LEGATE_DEMO_LISTEN:-127.0.0.1:19901}
export LEGATE_DEMO_ADMIN=$ADMIN LEGATE_DEMO_LISTEN=$LISTEN

echo "== legate check --config routes/default"
"$LEGATE_BIN" check --config routes/default >/dev/null

LOG=$(mktemp)
"$LEGATE_BIN" --config routes/default --admin "$ADMIN" --shutdown-delay 0s --log-format text >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT

for _ in $(seq 100); do
  curl -fs "http://$ADMIN/readyz" >/dev/null 2>&1 && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; echo "legate exited"; exit 1; }
  sleep 0.1
done
curl -fsS "http://$ADMIN/readyz" >/dev/null

echo "== through legate: GET http://$LISTEN/healthz (forwarded to the admin server at $ADMIN)"
curl -fsS "http://$LISTEN/healthz"
for _ in 1 2 3; do curl -fsS -o /dev/null "http://$LISTEN/config"; done

echo "== what legate counted (GET http://$ADMIN/metrics)"
curl -fsS "http://$ADMIN/metrics" | grep -E '^legate_(listener_connections_total|bytes_total|upstream_connects_total\{.*ok)'
conns=$(curl -fsS "http://$ADMIN/metrics" | awk '/^legate_listener_connections_total\{listener="admin-loop"\}/ {print $2}')
[ "${conns:-0}" -ge 4 ] || { echo "expected at least 4 forwarded connections, saw ${conns:-0}"; exit 1; }

echo "== SIGTERM: drain and exit"
kill -TERM $PID
wait $PID
echo "legate exited with $? after forwarding $conns connections"
