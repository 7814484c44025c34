#!/usr/bin/env bash
# legate vs HAProxy vs nginx, same machine, same run.
#
#   bash benches/pgo.sh build && bash benches/proxy_bench.sh        # 5 runs x 10 s per line
#   bash benches/proxy_bench.sh --runs 3 --duration 5                 # quicker
#   bash benches/proxy_bench.sh --smoke                               # 1 s, 1 run: proves it starts (CI)
#
# Each proxy runs alone on CPU 1 with one worker (legate --threads 1, HAProxy
# nbthread 1, nginx worker_processes 1); wrk, iperf3 and the backends share
# CPU 0. With one core on each side the load side saturates first, so req/s
# alone cannot separate good proxies: the proxy's own CPU time (utime+stime
# from /proc over the run) per request and per GB can. Proxies alternate
# within each run, each run starting one proxy later (A B C, B C A, ...),
# after one uncounted second of each line per proxy; medians with min-max are
# reported, and legate's ratio to each anchor paired by run (median, min-max,
# and in how many runs it was at or below the anchor). It also reports which TCP
# listeners answer a client that half-closes after its request.
# Needs (Debian): nginx libnginx-mod-stream haproxy wrk iperf3, and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=5 DUR=10 SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --duration) DUR=$2; shift 2 ;;
    --smoke) SMOKE=1; RUNS=1; DUR=1; shift ;;
    *) echo "usage: $0 [--runs N] [--duration S] [--smoke]" >&2; exit 2 ;;
  esac
done
LEGATE=${LEGATE_BIN:-target/release/legate}
[ -x "$LEGATE" ] || { echo "build first: bash benches/pgo.sh build (or set LEGATE_BIN)" >&2; exit 2; }
for t in nginx haproxy wrk iperf3 curl taskset; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done

W=$(mktemp -d)
cleanup() { set +e; for f in $W/*.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; wait 2>/dev/null; [ "${KEEP_BENCH_DIR:-0}" = 1 ] && echo "kept $W" >&2 || rm -rf "$W"; }
trap cleanup EXIT
KEEP=${KEEP_BENCH_DIR:-0}
H=127.0.0.1
BACK=$H:31080 IPERF_PORT=31201
# Per proxy: HTTP port, TCP-to-nginx port, TCP-to-iperf port.
# nginx_deferred: nginx with `listen ... deferred` (TCP_DEFER_ACCEPT, which
# legate's HTTP listeners set), measured on the new-connection HTTP line.
# nginx_half_close: nginx's stream proxy with `proxy_half_close on`, measured
# on the new-connection TCP line. legate and HAProxy pass the first FIN on and
# keep the other direction open until it ends too; nginx by default closes
# both sides at the first EOF, which is less work per connection and loses the
# answer to a client that half-closes after its request.
declare -A HTTP=([legate]=31101 [haproxy]=31111 [nginx]=31121 [nginx_deferred]=31141 [direct]=31080)
declare -A TCP=([legate]=31102 [haproxy]=31112 [haproxy_splice]=31132 [nginx]=31122 [nginx_half_close]=31142 [direct]=31080)
declare -A BULK=([legate]=31103 [haproxy]=31113 [haproxy_splice]=31133 [nginx]=31123 [direct]=$IPERF_PORT)
declare -A PID

ngx() { # dir, extra main-context lines, http body, stream body
  mkdir -p $W/$1
  cat > $W/$1/nginx.conf <<CONF
daemon off; master_process off; worker_processes 1; error_log $W/$1/error.log; pid $W/$1/nginx.pid;
$2
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $W/$1; proxy_temp_path $W/$1; fastcgi_temp_path $W/$1; uwsgi_temp_path $W/$1; scgi_temp_path $W/$1;
  $3
}
$4
CONF
}
ngx backend "" "server { listen $BACK backlog=4096; keepalive_requests 10000000; location / { return 200 'ok'; } }" ""
# nginx's HTTP proxy, listening with the given listen parameters.
ngx_http_proxy() { echo "upstream b { server $BACK; keepalive 64; } server { listen $1; keepalive_requests 10000000; location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ''; } }"; }
ngx nginx "load_module /usr/lib/nginx/modules/ngx_stream_module.so;" \
  "$(ngx_http_proxy "$H:${HTTP[nginx]} backlog=4096")" \
  "stream { server { listen $H:${TCP[nginx]} backlog=4096; proxy_pass $BACK; } server { listen $H:${BULK[nginx]}; proxy_pass $H:$IPERF_PORT; } }"
ngx nginx_deferred "" "$(ngx_http_proxy "$H:${HTTP[nginx_deferred]} backlog=4096 deferred")" ""
ngx nginx_half_close "load_module /usr/lib/nginx/modules/ngx_stream_module.so;" "" \
  "stream { server { listen $H:${TCP[nginx_half_close]} backlog=4096; proxy_pass $BACK; proxy_half_close on; } }"

hap() { # name, extra defaults options, ports...
  cat > $W/$1.cfg <<CFG
global
  nbthread 1
  maxconn 4000
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  $2
frontend http_in
  mode http
  bind $H:$3 backlog 4096
  default_backend http_back
backend http_back
  mode http
  http-reuse always
  server s $BACK
frontend tcp_in
  mode tcp
  bind $H:$4 backlog 4096
  default_backend tcp_back
backend tcp_back
  mode tcp
  server s $BACK
frontend bulk_in
  mode tcp
  bind $H:$5
  default_backend bulk_back
backend bulk_back
  mode tcp
  server s $H:$IPERF_PORT
CFG
}
hap haproxy "" ${HTTP[haproxy]} ${TCP[haproxy]} ${BULK[haproxy]}
hap haproxy_splice "option splice-auto" 31131 ${TCP[haproxy_splice]} ${BULK[haproxy_splice]}

mkdir -p $W/legate
cat > $W/legate/bench.yaml <<YAML
listeners:
  - { name: http, listen: "$H:${HTTP[legate]}", protocol: http, cluster: backend }
  - { name: tcp, listen: "$H:${TCP[legate]}", cluster: backend }
  - { name: bulk, listen: "$H:${BULK[legate]}", cluster: iperf }
clusters:
  - { name: backend, endpoints: [ "$BACK" ] }
  - { name: iperf, endpoints: [ "$H:$IPERF_PORT" ] }
YAML

start() { # name, cpu, command...
  local name=$1 cpu=$2; shift 2
  taskset -c $cpu "$@" > $W/$name.log 2>&1 & echo $! > $W/$name.pid
  PID[$name]=$!
}
ulimit -n 20000 2>/dev/null || true
start backend 0 nginx -p $W/backend -c $W/backend/nginx.conf
start iperf 0 iperf3 -s -B $H -p $IPERF_PORT
start legate 1 $LEGATE --config $W/legate --admin $H:0 --threads 1 --log warn --shutdown-delay 0s
start haproxy 1 haproxy -f $W/haproxy.cfg -db
start haproxy_splice 1 haproxy -f $W/haproxy_splice.cfg -db
start nginx 1 nginx -p $W/nginx -c $W/nginx/nginx.conf
start nginx_deferred 1 nginx -p $W/nginx_deferred -c $W/nginx_deferred/nginx.conf
start nginx_half_close 1 nginx -p $W/nginx_half_close -c $W/nginx_half_close/nginx.conf
for i in $(seq 100); do
  ok=1; for p in legate haproxy nginx nginx_deferred direct; do curl -fs -o /dev/null http://$H:${HTTP[$p]}/ || ok=0; done
  for p in legate haproxy haproxy_splice nginx nginx_half_close; do curl -fs -o /dev/null http://$H:${TCP[$p]}/ || ok=0; done
  [ $ok = 1 ] && break; sleep 0.1
done
[ $ok = 1 ] || { tail $W/*.log; echo "proxies did not start" >&2; exit 1; }

# User and kernel clock ticks, "U S".
cpu_ticks() { [ "$1" = direct ] && { echo 0 0; return; }; awk '{print $14, $15}' /proc/${PID[$1]}/stat; }
rss_kb() { [ "$1" = direct ] && { echo 0; return; }; awk '/VmRSS/ {print $2}' /proc/${PID[$1]}/status; }
HZ=$(getconf CLK_TCK)
R=$W/results.tsv   # test proxy value cpu_us_per_unit p99 rss_kb user_us_per_unit
: > $R

wrk_run() { # test, proxy, url, extra wrk args...
  local test=$1 p=$2 url=$3; shift 3
  local u0 s0 u1 s1 out peak=0
  read u0 s0 < <(cpu_ticks $p)
  ( while sleep 0.5; do rss_kb $p; done ) > $W/rss.$p & local sampler=$!
  out=$(taskset -c 0 wrk -t1 -c50 -d${DUR}s --latency "$@" "$url" 2>&1)
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null || true
  read u1 s1 < <(cpu_ticks $p)
  peak=$(sort -n $W/rss.$p | tail -1); peak=${peak:-0}
  local rps p99 reqs errs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '/^ +99%/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  [ -n "$errs" ] && [ $SMOKE = 0 ] && echo "  note: $test/$p: $errs" >&2
  per_req() { awk -v c=$1 -v n=${reqs:-1} -v hz=$HZ 'BEGIN {printf "%.2f", c/hz*1e6/n}'; }
  echo -e "$test\t$p\t$rps\t$(per_req $((u1-u0+s1-s0)))\t$p99\t$peak\t$(per_req $((u1-u0)))" >> $R
}

bulk_run() { # proxy
  local p=$1 u0 s0 u1 s1 out gbps bytes
  read u0 s0 < <(cpu_ticks $p)
  out=$(taskset -c 0 iperf3 -c $H -p ${BULK[$p]} -t $DUR --bidir -J 2>/dev/null)
  read u1 s1 < <(cpu_ticks $p)
  bytes=$(python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]; print(d["sum_sent"]["bytes"]+d["sum_sent_bidir_reverse"]["bytes"])' <<<"$out")
  gbps=$(awk -v b=$bytes -v t=$DUR 'BEGIN {printf "%.2f", b*8/t/1e9}')
  echo -e "bulk\t$p\t$gbps\t$(awk -v c=$((u1-u0+s1-s0)) -v b=$bytes -v hz=$HZ 'BEGIN {printf "%.0f", c/hz*1e3/(b/1e9)}')\t-\t$(rss_kb $p)\t-" >> $R
}

# The first N-1 words after the run number, rotated by it: each run starts
# one proxy later, so none always goes first (right after the previous line's
# load) or last.
rotate() { local k=$(( $1 % ($# - 1) )); shift; echo "${@:k+1}" "${@:1:k}"; }

for p in legate haproxy nginx; do echo -e "idle\t$p\t-\t-\t-\t$(rss_kb $p)\t-" >> $R; done
# What the TCP listeners do with a client that sends its request and then
# half-closes (shutdown SHUT_WR): answer it, or close at its FIN.
python3 - $H legate=${TCP[legate]} haproxy=${TCP[haproxy]} nginx=${TCP[nginx]} \
  nginx_half_close=${TCP[nginx_half_close]} > $W/half_close.txt <<'PY'
import socket, sys
answered = []
for arg in sys.argv[2:]:
    name, port = arg.split("=")
    data = b""
    with socket.create_connection((sys.argv[1], int(port)), timeout=2) as s:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
    answered.append(f"{name} {'yes' if data.startswith(b'HTTP/1.1 200') else 'no'}")
print("- TCP listener answers a client that half-closes after its request: " + ", ".join(answered))
PY
if [ $SMOKE = 0 ]; then
  # One second of each line per proxy, not counted: the first measured run
  # should not be the one that maps the code and grows the heap.
  for p in legate haproxy nginx nginx_deferred; do
    taskset -c 0 wrk -t1 -c50 -d1s http://$H:${HTTP[$p]}/ > /dev/null 2>&1
    taskset -c 0 wrk -t1 -c50 -d1s -H "Connection: close" http://$H:${HTTP[$p]}/ > /dev/null 2>&1
  done
  for p in legate haproxy haproxy_splice nginx nginx_half_close; do
    taskset -c 0 wrk -t1 -c50 -d1s -H "Connection: close" http://$H:${TCP[$p]}/ > /dev/null 2>&1
  done
  for p in legate haproxy nginx; do
    taskset -c 0 wrk -t1 -c50 -d1s http://$H:${TCP[$p]}/ > /dev/null 2>&1
  done
fi
for run in $(seq $RUNS); do
  echo "run $run/$RUNS" >&2
  for p in $(rotate $run legate haproxy nginx direct); do wrk_run keepalive $p http://$H:${HTTP[$p]}/; done
  for p in $(rotate $run legate haproxy nginx nginx_deferred direct); do wrk_run close_http $p http://$H:${HTTP[$p]}/ -H "Connection: close"; done
  for p in $(rotate $run legate haproxy haproxy_splice nginx nginx_half_close direct); do wrk_run close_tcp $p http://$H:${TCP[$p]}/ -H "Connection: close"; done
  # Small messages on long-lived connections (what a database or broker
  # client sends), through the TCP listeners.
  for p in $(rotate $run legate haproxy nginx direct); do wrk_run keepalive_tcp $p http://$H:${TCP[$p]}/; done
  for p in $(rotate $run legate haproxy haproxy_splice nginx direct); do bulk_run $p; done
done

python3 - "$R" "$RUNS" "$DUR" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs, dur = sys.argv[2], sys.argv[3]
by = collections.defaultdict(list)
for t, p, v, cpu, p99, rss, user in rows:
    by[(t, p)].append((v, cpu, p99, rss, user))
def med(xs):
    xs = [float(x) for x in xs if x not in ("-", "")]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None
def ms(x):
    x = x.strip()
    if x.endswith("us"): return float(x[:-2]) / 1000
    if x.endswith("ms"): return float(x[:-2])
    if x.endswith("s"): return float(x[:-1]) * 1000
    return float("nan")
units = {"keepalive": ("req/s", "µs CPU/req"), "close_http": ("req/s", "µs CPU/req"),
         "close_tcp": ("req/s", "µs CPU/req"), "keepalive_tcp": ("req/s", "µs CPU/req"),
         "bulk": ("Gbit/s", "ms CPU/GB")}
names = {"keepalive": "HTTP/1.1 keep-alive (wrk -c50)", "close_http": "new connection per request, HTTP listener",
         "close_tcp": "new connection per request, TCP listener",
         "keepalive_tcp": "HTTP/1.1 keep-alive through the TCP listener (wrk -c50)", "bulk": "TCP bulk, iperf3 --bidir"}
print(f"Runs: {runs} x {dur} s per line, medians (min-max). Proxy pinned to CPU 1, load and backends to CPU 0.\n")
print("| test | proxy | throughput | proxy CPU | p99 | peak RSS |")
print("| --- | --- | --- | --- | --- | --- |")
for t in ["keepalive", "close_http", "close_tcp", "keepalive_tcp", "bulk"]:
    for p in ["legate", "haproxy", "haproxy_splice", "nginx", "nginx_deferred", "nginx_half_close", "direct"]:
        v = by.get((t, p))
        if not v: continue
        thr, cpu = med([x[0] for x in v]), med([x[1] for x in v])
        p99s = [ms(x[2]) for x in v if x[2] not in ("-", "")]
        p99 = f"{statistics.median(p99s):.2f} ms" if p99s else "-"
        rss = max(int(x[3]) for x in v) if p != "direct" else 0
        u = units[t]
        cpu_s = "-" if p == "direct" or cpu is None else f"{cpu[0]:.1f} {u[1]} ({cpu[1]:.1f}-{cpu[2]:.1f})"
        print(f"| {names[t]} | {p} | {thr[0]:,.{2 if t=='bulk' else 0}f} {u[0]} ({thr[1]:,.{2 if t=='bulk' else 0}f}-{thr[2]:,.{2 if t=='bulk' else 0}f}) | {cpu_s} | {p99} | {rss/1024:.1f} MB |" if p != "direct" else
              f"| {names[t]} | direct (ceiling) | {thr[0]:,.{2 if t=='bulk' else 0}f} {u[0]} | - | {p99} | - |")
print()
for t in ["keepalive", "close_http", "close_tcp", "keepalive_tcp", "bulk"]:
    l = by.get((t, "legate"))
    if not l: continue
    lt, lc = med([x[0] for x in l])[0], med([x[1] for x in l])[0]
    out = []
    for p in ["haproxy", "haproxy_splice", "nginx", "nginx_deferred", "nginx_half_close"]:
        v = by.get((t, p))
        if not v: continue
        pt, pc = med([x[0] for x in v])[0], med([x[1] for x in v])[0]
        out.append(f"legate/{p}: throughput {lt/pt:.2f}x, CPU {lc/pc:.2f}x")
    print(f"- {names[t]}: " + "; ".join(out))
# The same ratios paired by run: each run measures legate and the anchor a few
# seconds apart, while the VM's speed drifts by tens of per cent over a whole
# benchmark, so the ratio within a run is steadier than the ratio of medians.
def paired(t, p, i, f=float):
    l, v = by.get((t, "legate"), []), by.get((t, p), [])
    xs = [f(a[i]) / f(b[i]) for a, b in zip(l, v) if "-" not in (a[i], b[i]) and f(b[i]) > 0]
    if not xs: return None
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f}, ≤ 1 in {sum(x <= 1 for x in xs)} of {len(xs)})"
for t in ["keepalive", "close_http", "close_tcp", "keepalive_tcp", "bulk"]:
    out = []
    for p in ["haproxy", "nginx", "nginx_deferred", "nginx_half_close"]:
        cpu = paired(t, p, 1)
        if not cpu: continue
        p99 = paired(t, p, 2, ms) if t != "bulk" else None
        out.append(f"legate/{p} CPU {cpu}" + (f", p99 {p99}" if p99 else ""))
    if out:
        print(f"- {names[t]}, per run: " + "; ".join(out))
# Where the CPU goes: the user-space part is each proxy's own code, the rest the
# kernel's socket work.
for t in ["keepalive", "close_http", "close_tcp", "keepalive_tcp"]:
    out = []
    for p in ["legate", "haproxy", "nginx", "nginx_deferred", "nginx_half_close"]:
        v = by.get((t, p))
        if v:
            user, total = med([x[4] for x in v])[0], med([x[1] for x in v])[0]
            out.append(f"{p} {user:.1f} + {total - user:.1f}")
    if out:
        print(f"- {names[t]}, µs CPU/req in user space + kernel: " + ", ".join(out))
idle = {p: int(v[0][3]) for (t, p), v in by.items() if t == "idle"}
print(f"- idle RSS: " + ", ".join(f"{p} {kb/1024:.1f} MB" for p, kb in idle.items()))
PY
cat $W/half_close.txt
