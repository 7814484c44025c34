#!/usr/bin/env bash
# Example 5, failover: an HTTP listener whose cluster `primary` fails over to
# `secondary`. The primary is killed mid-traffic: requests keep succeeding on
# the secondary and /metrics shows the failovers; the primary comes back and
# traffic returns to it after its health checks pass.
#   bash examples/failover.sh
source "$(dirname "$0")/lib/common.sh"
for t in nginx curl; do command -v $t >/dev/null || fail "needs $t"; done

P1=$(free_port); P2=$(free_port); APP=$(free_port); ADMIN=$(free_port)
backend() { # name port
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; error_log $WORK/$1/error.log; pid $WORK/$1/nginx.pid;
events {}
http { access_log off; client_body_temp_path $WORK/$1; proxy_temp_path $WORK/$1; fastcgi_temp_path $WORK/$1; uwsgi_temp_path $WORK/$1; scgi_temp_path $WORK/$1;
  server { listen 127.0.0.1:$2; location / { return 200 "$1\n"; } } }
CONF
  nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" & PIDS+=($!)
  echo $! > "$WORK/$1.pid"
  wait_for "$1" curl -fs "http://127.0.0.1:$2/"
}
say "primary on :$P1, secondary on :$P2"
backend primary "$P1"; backend secondary "$P2"

mkdir -p "$WORK/routes"
cat > "$WORK/routes/legate.yaml" <<YAML
listeners:
  - { name: app, listen: "127.0.0.1:$APP", protocol: http, cluster: primary }
clusters:
  - name: primary
    endpoints: [ "127.0.0.1:$P1" ]
    failover: [ secondary ]
    connect_timeout: 1s
    health: { interval: 300ms, timeout: 200ms, unhealthy: 2, healthy: 2 }
  - name: secondary
    endpoints: [ "127.0.0.1:$P2" ]
YAML
start_legate "$WORK/routes" "$ADMIN"

requests() { # n -> prints a summary like "10 x primary"
  for _ in $(seq "$1"); do curl -fsS "http://127.0.0.1:$APP/" || echo FAILED; done | sort | uniq -c | sed 's/^ *//'
}
failovers() { metric "$ADMIN" 'legate_cluster_failovers_total{cluster="primary",to="secondary"}'; }

say "traffic with both up"; r=$(requests 10); echo "$r"
[[ $r == "10 primary" ]] || fail "expected all on primary"

say "kill the primary"
kill "$(cat "$WORK/primary.pid")"; wait "$(cat "$WORK/primary.pid")" 2>/dev/null || true
r=$(requests 20); echo "$r"
[[ $r == "20 secondary" ]] || fail "requests failed or did not fail over: $r"
echo "legate_cluster_failovers_total{cluster=\"primary\",to=\"secondary\"} = $(failovers)"
wait_for "probes to mark the primary down" bash -c "[ \"\$(curl -fs http://127.0.0.1:$ADMIN/metrics | awk '\$1 ~ /legate_endpoint_healthy\\{cluster=\"primary\"/ {print \$2}')\" = 0 ]"
echo "legate_endpoint_healthy{cluster=\"primary\"} = 0"

say "bring the primary back"
backend primary "$P1"
wait_for "failback to the primary" bash -c "[ \"\$(curl -fs http://127.0.0.1:$APP/)\" = primary ]"
r=$(requests 10); echo "$r"
[[ $r == "10 primary" ]] || fail "did not fail back: $r"
say "PASS: no failed request, failover counted, failback after the health threshold"
