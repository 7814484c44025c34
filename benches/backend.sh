# Sourced by benches/ab.sh and benches/instructions.sh: a work dir with a
# cleanup trap, and an nginx `return 200 'ok'` keep-alive backend.
#
#   W=$(mktemp -d); H=127.0.0.1; BACK=ADDR; source benches/backend.sh; start_backend $BACK [prefix...]

cleanup() { set +e; for f in $W/*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

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

legate_config() { # dir, port: an HTTP listener on $H:port forwarding to the backend $BACK
  mkdir -p $1
  printf 'listeners:\n  - { name: http, listen: "%s:%s", protocol: http, cluster: backend }\nclusters:\n  - { name: backend, endpoints: [ "%s" ] }\n' $H $2 $BACK > $1/bench.yaml
}
