#!/usr/bin/env bash
# Quick HTTP/1.1 keep-alive comparison, same machine, same run:
# wrk → {legate, nginx as a proxy} → nginx backend (fixed 200).
# The proxy under test is pinned alone to CPU 1 with one worker; wrk and the
# backend share CPU 0. Runs alternate (legate, nginx, legate, nginx, ...).
#   bash benches/http_quick.sh [RUNS] [SECONDS]
# Needs: nginx, wrk (Debian), a release build (bash benches/pgo.sh build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SECS=${2:-5}
W=$(mktemp -d)
trap 'kill $(cat $W/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf $W' EXIT
BACKEND=127.0.0.1:28081; NGINX_PROXY=127.0.0.1:28082; LEGATE=127.0.0.1:28083

nginx_conf() { # name, body of the server block
  mkdir -p $W/$1
  cat > $W/$1/nginx.conf <<CONF
daemon off; master_process off; worker_processes 1; error_log $W/$1/error.log; pid $W/$1/nginx.pid;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $W/$1; proxy_temp_path $W/$1; fastcgi_temp_path $W/$1; uwsgi_temp_path $W/$1; scgi_temp_path $W/$1;
  upstream backend { server $BACKEND; keepalive 64; }
  $2
}
CONF
}
nginx_conf backend "server { listen $BACKEND; keepalive_requests 1000000; location / { return 200 'ok'; } }"
nginx_conf proxy "server { listen $NGINX_PROXY; keepalive_requests 1000000; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ''; } }"
taskset -c 0 nginx -p $W/backend -c $W/backend/nginx.conf & echo $! > $W/b.pid
taskset -c 1 nginx -p $W/proxy -c $W/proxy/nginx.conf & echo $! > $W/p.pid
mkdir -p $W/legate
cat > $W/legate/l.yaml <<YAML
listeners:
  - { name: web, listen: "$LEGATE", protocol: http, cluster: backend }
clusters:
  - { name: backend, endpoints: [ "$BACKEND" ] }
YAML
taskset -c 1 target/release/legate --config $W/legate --admin 127.0.0.1:0 --threads 1 --log warn & echo $! > $W/l.pid
sleep 1
for a in $BACKEND $NGINX_PROXY $LEGATE; do curl -fs http://$a/ >/dev/null; done

run() { taskset -c 0 wrk -t1 -c50 -d${SECS}s --latency http://$1/ | awk '/Requests\/sec/ {rps=$2} /^ +99%/ {p99=$2} END {print rps, p99}'; }
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
printf '%-8s %10s %8s %12s\n' proxy req/s p99 "CPU us/req"
for i in $(seq $RUNS); do
  for p in legate nginx; do
    if [ $p = legate ]; then addr=$LEGATE; pid=$(cat $W/l.pid); else addr=$NGINX_PROXY; pid=$(cat $W/p.pid); fi
    c0=$(cpu $pid); out=$(run $addr); c1=$(cpu $pid)
    rps=${out% *}; p99=${out#* }
    reqs=$(awk -v r=$rps -v s=$SECS 'BEGIN {print r*s}')
    us=$(awk -v c=$((c1-c0)) -v n=$reqs -v hz=$(getconf CLK_TCK) 'BEGIN {printf "%.1f", c/hz*1e6/n}')
    printf '%-8s %10s %8s %12s\n' $p $rps $p99 $us
  done
done
