#!/usr/bin/env bash
# Example 3, broker/cache migration: two real redis-server instances. New
# connections are first split 80/20 between old and new, then the ConfigMap
# cuts over fully to the new one; a client connection left open on the old
# instance is closed after the drain_on_change grace, and reconnects land on
# the new instance.
#   bash examples/redis-migration.sh          (needs redis-server, redis-cli)
source "$(dirname "$0")/lib/common.sh"
for t in redis-server redis-cli; do command -v $t >/dev/null || fail "needs $t (apt-get install redis-server redis-tools)"; done

OLD=$(free_port); NEW=$(free_port); APP=$(free_port); ADMIN=$(free_port)
for r in old new; do
  port=$OLD; [ $r = new ] && port=$NEW
  mkdir -p "$WORK/$r"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$WORK/$r" > "$WORK/$r/log" 2>&1 &
  PIDS+=($!)
  wait_for "redis $r" redis-cli -p "$port" ping
done
say "redis old on :$OLD, new on :$NEW"

routes() { # old-weight new-weight
  cat > "$WORK/routes.yaml" <<YAML
listeners:
  - name: cache
    listen: "127.0.0.1:$APP"
    split: [ { cluster: redis-old, weight: $1 }, { cluster: redis-new, weight: $2 } ]
clusters:
  - { name: redis-old, endpoints: [ "127.0.0.1:$OLD" ], drain_on_change: 1s }
  - { name: redis-new, endpoints: [ "127.0.0.1:$NEW" ] }
YAML
}
routes 100 0
configmap_init "$WORK/cm" "$WORK/routes.yaml"
start_legate "$WORK/cm" "$ADMIN"

say "everything on the old instance; a long-lived client connection (redis-cli blocked on BLPOP for 30 s)"
( redis-cli -p "$APP" blpop never 30 > "$WORK/blpop.out" 2>&1; echo "exit $?" >> "$WORK/blpop.out" ) &
BLPOP=$!
wait_for "the blocked client" bash -c "[ \"\$(redis-cli -p $OLD info clients | awk -F: '/^blocked_clients/ {print \$2+0}')\" = 1 ]"

say "split 80/20 (a ConfigMap edit): 200 clients each write one key through localhost:$APP"
routes 80 20
configmap_swap "$WORK/cm" "$WORK/routes.yaml"
wait_for reload bash -c "curl -fs http://127.0.0.1:$ADMIN/metrics | grep -q '^legate_config_generation 2'"
for i in $(seq 200); do redis-cli -p "$APP" set "split:$i" x >/dev/null; done
old_n=$(redis-cli -p "$OLD" dbsize); new_n=$(redis-cli -p "$NEW" dbsize)
echo "keys: old=$old_n new=$new_n"
[ "$new_n" -gt 10 ] && [ "$old_n" -gt "$new_n" ] || fail "split not near 80/20"

[ -n "$(jobs -r)" ] || fail "the blocked client ended early (a weight change must not drain it)"

say "cut over: weights 0/100 (the old cluster drops out of the split)"
routes 0 100
configmap_swap "$WORK/cm" "$WORK/routes.yaml"
wait_for reload bash -c "curl -fs http://127.0.0.1:$ADMIN/metrics | grep -q '^legate_config_generation 3'"
started=$(date +%s)
wait $BLPOP || true
echo "the blocked client ended after $(( $(date +%s) - started )) s: $(tr '\n' ' ' < "$WORK/blpop.out")"
[ $(( $(date +%s) - started )) -lt 10 ] || fail "the connection on the old instance was not drained"

for i in $(seq 50); do redis-cli -p "$APP" set "after:$i" x >/dev/null; done
old_after=$(redis-cli -p "$OLD" --scan --pattern 'after:*' | wc -l)
new_after=$(redis-cli -p "$NEW" --scan --pattern 'after:*' | wc -l)
echo "keys written after the cut-over: old=$old_after new=$new_after"
[ "$old_after" = 0 ] && [ "$new_after" = 50 ] || fail "writes did not all go to the new instance"
say "PASS: split, then cut-over with the old connections drained"
