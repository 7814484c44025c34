#!/usr/bin/env bash
# Two legate builds, same machine, same run: did a change cost CPU per request?
#
#   bash benches/ab.sh OLD_BINARY NEW_BINARY [rounds] [seconds]   (TESTS="keepalive" for one line)
#
# Both run --threads 1 pinned to CPU 1 behind the same nginx `return 200`
# backend; wrk (-t1 -c50) and the backend share CPU 0. Rounds alternate
# A B A B ... on HTTP keep-alive and on a new connection per request
# (TESTS also takes tcp_keepalive and tcp_close: the same through a TCP listener); the
# proxy's CPU time (utime+stime from /proc) per request is reported as the
# median over rounds, with the B/A ratio. Needs nginx, wrk, curl, taskset.
set -euo pipefail
A=${1:?old binary}; B=${2:?new binary}; ROUNDS=${3:-8}; DUR=${4:-5}
W=$(mktemp -d); H=127.0.0.1; BACK=$H:31380
source "$(dirname "$0")/backend.sh"
start_backend $BACK taskset -c 0
declare -A PORT=([a]=31381 [b]=31382) TCP=([a]=31383 [b]=31384) BIN=([a]=$A [b]=$B) PID
for v in a b; do
  legate_config $W/$v ${PORT[$v]} ${TCP[$v]}
  taskset -c 1 ${BIN[$v]} --config $W/$v --admin $H:0 --threads 1 --log warn --shutdown-delay 0s > $W/$v.log 2>&1 & echo $! > $W/$v.pid
  PID[$v]=$!
done
for i in $(seq 100); do
  curl -fs -o /dev/null http://$H:${PORT[a]}/ && curl -fs -o /dev/null http://$H:${PORT[b]}/ && break; sleep 0.1
done
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' /proc/${PID[$1]}/stat; }
run() { # variant, port, extra wrk args -> µs CPU per request
  local v=$1 port=$2; shift 2; local c0 c1 out reqs
  c0=$(ticks $v)
  out=$(taskset -c 0 wrk -t1 -c50 -d${DUR}s "$@" http://$H:$port/ 2>&1)
  c1=$(ticks $v)
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  awk -v c=$((c1-c0)) -v n=${reqs:-1} -v hz=$HZ 'BEGIN {printf "%.2f\n", c/hz*1e6/n}'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for test in ${TESTS:-keepalive close}; do
  args=(); case $test in *close) args=(-H "Connection: close") ;; esac
  port_a=${PORT[a]} port_b=${PORT[b]}
  case $test in tcp_*) port_a=${TCP[a]} port_b=${TCP[b]} ;; esac
  : > $W/$test.a; : > $W/$test.b
  for r in $(seq $ROUNDS); do
    run a $port_a "${args[@]}" >> $W/$test.a
    run b $port_b "${args[@]}" >> $W/$test.b
  done
  ma=$(median < $W/$test.a); mb=$(median < $W/$test.b)
  echo "$test: A $ma µs CPU/req (runs: $(tr '\n' ' ' < $W/$test.a)), B $mb µs CPU/req (runs: $(tr '\n' ' ' < $W/$test.b)), B/A $(awk -v a=$ma -v b=$mb 'BEGIN {printf "%.3f", b/a}')"
done
