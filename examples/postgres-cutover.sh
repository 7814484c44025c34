#!/usr/bin/env bash
# Example 2, database cut-over: two real PostgreSQL clusters behind a
# `protocol: postgres` listener, pgbench writing through legate (a new
# connection per transaction, like an app's pool recycling connections), and
# the ConfigMap flipped from the old cluster to the new one mid-run, the way
# the kubelet updates a mounted ConfigMap. The old cluster is fenced: new
# sessions wait until the old ones are gone, so no write lands on the old
# cluster after the first one on the new. An idle session left on the old
# cluster is closed at once (between transactions); one stuck in a long query
# is closed by the drain_on_change grace. pgbench finishes without errors.
#   bash examples/postgres-cutover.sh        (as root: initdb runs as user postgres)
source "$(dirname "$0")/lib/common.sh"
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PGBIN/initdb" ] || fail "needs PostgreSQL (apt-get install postgresql)"
for t in pgbench psql runuser; do command -v $t >/dev/null || fail "needs $t"; done

OLD=$(free_port); NEW=$(free_port); APP=$(free_port); ADMIN=$(free_port)
chmod 755 "$WORK"
pg_start() { # name port
  install -d -o postgres -g postgres "$WORK/$1"
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/$1/data" -U postgres -A trust --no-sync >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/$1/data" -l "$WORK/$1/log" -w -t 30 start \
    -o "-c listen_addresses=127.0.0.1 -p $2 -k $WORK/$1 -c fsync=off -c max_connections=200" >/dev/null
  CLEANUP_EXTRA="${CLEANUP_EXTRA:-true}; runuser -u postgres -- $PGBIN/pg_ctl -D $WORK/$1/data -m immediate -w stop >/dev/null 2>&1"
  psql -h 127.0.0.1 -p "$2" -U postgres -qc "create table orders (id serial primary key, at timestamptz default clock_timestamp(), note text)"
}
say "two PostgreSQL clusters: old on :$OLD, new on :$NEW"
pg_start old "$OLD"; pg_start new "$NEW"

routes() { # cluster-the-listener-uses
  cat > "$WORK/routes.yaml" <<YAML
listeners:
  - { name: orders-db, listen: "127.0.0.1:$APP", protocol: postgres, cluster: $1 }
clusters:
  - { name: pg-old, endpoints: [ "127.0.0.1:$OLD" ], drain_on_change: 2s, cutover: fenced, health: { kind: postgres } }
  - { name: pg-new, endpoints: [ "127.0.0.1:$NEW" ], drain_on_change: 2s, health: { kind: postgres } }
YAML
}
routes pg-old
configmap_init "$WORK/cm" "$WORK/routes.yaml"
start_legate "$WORK/cm" "$ADMIN"
say "legate: the app's localhost:$APP -> pg-old"

echo "insert into orders (note) values ('pgbench');" > "$WORK/tx.sql"
pgbench -h 127.0.0.1 -p "$APP" -U postgres -n -C -c 4 -T 8 -f "$WORK/tx.sql" postgres > "$WORK/pgbench.log" 2>&1 &
BENCH=$!
psql -h 127.0.0.1 -p "$APP" -U postgres -qAtc "select pg_sleep(30)" > "$WORK/session.log" 2>&1 &
SESSION=$!
mkfifo "$WORK/idle.fifo"
psql -h 127.0.0.1 -p "$APP" -U postgres -qAt < "$WORK/idle.fifo" > "$WORK/idle.log" 2>&1 &
IDLE=$!
PIDS+=($IDLE)
exec 7> "$WORK/idle.fifo"   # an idle session: psql waits for input that never comes
sleep 3

routes pg-new
say "before the flip: legate diff (the running legate's /config vs the new files)"
mkdir -p "$WORK/next" && cp "$WORK/routes.yaml" "$WORK/next/"
set +e; "$LEGATE_BIN" diff "http://127.0.0.1:$ADMIN" "$WORK/next" | tee "$WORK/diff.txt"; DIFF=${PIPESTATUS[0]}; set -e
[ "$DIFF" = 2 ] || fail "legate diff exited $DIFF, expected 2 (changes)"
grep -q "open sessions on pg-old (.* open now) close at their next transaction boundary" "$WORK/diff.txt" \
  || fail "legate diff did not say the sessions on pg-old leave at transaction boundaries"

say "flip the ConfigMap: orders-db -> pg-new (kubelet-style ..data swap)"
FLIP=$(psql -h 127.0.0.1 -p "$NEW" -U postgres -qAtc "select now()")
configmap_swap "$WORK/cm" "$WORK/routes.yaml"
wait_for "reload" bash -c "curl -fs http://127.0.0.1:$ADMIN/metrics | grep -q '^legate_config_generation 2'"

say "the idle session on pg-old is closed at once; the one in a long query after the 2 s grace"
wait_for "the idle session closed between transactions" bash -c \
  "curl -fs http://127.0.0.1:$ADMIN/metrics | grep -qE 'legate_postgres_sessions_closed_total[{]how=\"idle\",listener=\"orders-db\"[}] [1-9]'"
exec 7>&-; wait $IDLE || true   # psql only notices when it reads its input again
started=$(date +%s)
wait $SESSION && fail "the session on the old cluster was not closed" || true
echo "session ended after $(( $(date +%s) - started )) s: $(tr '\n' ' ' < "$WORK/session.log" | cut -c1-100)"

say "pgbench finishes"
wait $BENCH || { cat "$WORK/pgbench.log"; fail "pgbench failed"; }
grep -E "number of transactions actually processed|failed" "$WORK/pgbench.log" || true
grep -q "number of failed transactions: 0" "$WORK/pgbench.log" || grep -q "processed" "$WORK/pgbench.log" || fail "no pgbench summary"

old_rows=$(psql -h 127.0.0.1 -p "$OLD" -U postgres -qAtc "select count(*) from orders")
new_rows=$(psql -h 127.0.0.1 -p "$NEW" -U postgres -qAtc "select count(*) from orders")
new_after=$(psql -h 127.0.0.1 -p "$NEW" -U postgres -qAtc "select count(*) from orders where at >= '$FLIP'")
last_old=$(psql -h 127.0.0.1 -p "$OLD" -U postgres -qAtc "select max(at) from orders")
first_new=$(psql -h 127.0.0.1 -p "$NEW" -U postgres -qAtc "select min(at) from orders")
fenced=$(psql -h 127.0.0.1 -p "$NEW" -U postgres -qAtc "select '$last_old'::timestamptz < '$first_new'::timestamptz")
echo "rows: old=$old_rows new=$new_rows (new since the flip: $new_after); last write on old $last_old, first on new $first_new"
curl -fs http://127.0.0.1:$ADMIN/metrics | grep -E '^legate_postgres_(sessions_closed_total|held_sessions_total|fence_wait_seconds_(sum|count))'
[ "$new_after" -gt 0 ] || fail "the new cluster got no writes after the flip"
[ "$fenced" = t ] || fail "a write landed on the old cluster after the first on the new (fence broken)"
say "PASS: cut over mid-run; pgbench finished; no two writers; writes moved to the new cluster"
