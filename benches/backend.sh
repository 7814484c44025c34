# Sourced by the benches' scripts: a work dir with a cleanup trap, an nginx
# `return 200 'ok'` keep-alive backend, and the route tables they run.
#
#   W=$(mktemp -d); H=127.0.0.1; BACK=ADDR; source benches/backend.sh; start_backend $BACK [prefix...]

cleanup() { set +e; for f in $W/*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

port() { # a free loopback port
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_backend() { # address, then an optional command prefix (taskset -c 0)
  local addr=$1; shift
  mkdir -p $W/backend
  cat > $W/backend/nginx.conf <<CONF
daemon off; master_process off; worker_processes 1; error_log $W/backend/error.log; pid $W/backend/nginx.pid;
worker_rlimit_nofile 16384; events { worker_connections 8192; }
http { access_log off; client_body_temp_path $W/backend; proxy_temp_path $W/backend; fastcgi_temp_path $W/backend; uwsgi_temp_path $W/backend; scgi_temp_path $W/backend;
  server { listen $addr backlog=4096; keepalive_requests 10000000; location / { return 200 'ok'; } } }
CONF
  ulimit -n 20000 2>/dev/null || true
  "$@" nginx -p $W/backend -c $W/backend/nginx.conf > $W/backend.log 2>&1 & echo $! > $W/backend.pid
}

legate_config() { # dir, port[, tcp port]: an HTTP (and a TCP) listener on $H forwarding to the backend $BACK
  mkdir -p $1
  { printf 'listeners:\n  - { name: http, listen: "%s:%s", protocol: http, cluster: backend }\n' $H $2
    [ -z "${3:-}" ] || printf '  - { name: tcp, listen: "%s:%s", cluster: backend }\n' $H $3
    printf 'clusters:\n  - { name: backend, endpoints: [ "%s" ] }\n' $BACK; } > $1/bench.yaml
}

training_config() { # dir: TCP on $H:$TCP and HTTP (two routes) on $H:$HTTP to $BACK, for the
  # profile and layout runs (benches/pgo.sh, benches/symbol-order.sh). Written like a real
  # table (comments, ${VAR:-default}), so start-up runs the same YAML code as with routes/.
  mkdir -p $1
  cat > $1/legate.yaml <<YAML
# Bench table for the profile and layout runs.
listeners:
  - { name: tcp, listen: "\${BENCH_TCP:-$H:$TCP}", cluster: backend }   # raw TCP
  - name: http
    listen: "$H:$HTTP"
    protocol: http
    routes:
      - { name: api, match: { path_prefix: /api/ }, cluster: backend, timeout: 5s }
      - { name: rest, cluster: backend }
clusters:
  - { name: backend, endpoints: [ "$BACK" ], connect_timeout: 1s, health: { interval: 1s, http_path: / } }
YAML
}

wait_ready() { # seconds: until legate (pid in $W/legate.pid) answers /readyz on $H:$ADMIN; else its log, exit 1
  for _ in $(seq $(($1 * 5))); do curl -fs http://$H:$ADMIN/readyz >/dev/null 2>&1 && return; sleep 0.2; done
  cat $W/legate.log >&2; exit 1
}

stop_legate() { # SIGTERM, and up to 20 s for it to exit (a profile or a callgrind dump is written at exit)
  kill -TERM "$(cat $W/legate.pid)"
  for _ in $(seq 100); do kill -0 "$(cat $W/legate.pid)" 2>/dev/null || return 0; sleep 0.2; done
}
