#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: unlike
# CPU time on a shared VM (±10% run to run), this repeats within ~0.1%, so it
# shows a change of a few hundred instructions in legate, hyper or tokio.
#
#   bash benches/instructions.sh BINARY [BINARY...]     (TESTS="keepalive" for one line of
#   keepalive, close (a new connection per request, HTTP listener), tcp (the same, TCP listener);
#   PRE="VAR=value" runs each binary with that environment, e.g. a GLIBC_TUNABLES setting)
#
# Each binary runs --threads 1 under valgrind --tool=callgrind behind an
# nginx `return 200` backend; wrk (-c10) warms it up for 2 s, the counters
# are zeroed, wrk runs SECS (default 5) more, and the instructions counted in
# that window are divided by the requests wrk completed. Kernel work (the
# syscalls) is not counted: see benches/proxy_bench.sh for whole CPU time.
# Needs valgrind, nginx, wrk, curl.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY...]" >&2; exit 2; }
SECS=${SECS:-5}
for t in valgrind callgrind_control nginx wrk curl; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done
W=$(mktemp -d); H=127.0.0.1; BACK=$H:31780; PORT=31781 TCP=31782
source "$(dirname "$0")/backend.sh"
start_backend $BACK
legate_config $W/l $PORT $TCP
count() { # binary, test -> "N requests, I instructions/request"
  local bin=$1 test=$2 args=() n url=http://$H:$PORT/
  [ $test = keepalive ] || args=(-H "Connection: close")
  [ $test = tcp ] && url=http://$H:$TCP/
  rm -f $W/cg.out*
  ${PRE:+env $PRE} valgrind --tool=callgrind --callgrind-out-file=$W/cg.out "$bin" --config $W/l --admin $H:0 --threads 1 --log warn --shutdown-delay 0s > $W/l.log 2>&1 &
  echo $! > $W/l.pid
  for i in $(seq 300); do curl -fs -o /dev/null http://$H:$PORT/ && break; sleep 0.1; done
  wrk -t1 -c10 -d2s "${args[@]}" $url > /dev/null
  callgrind_control -z $(cat $W/l.pid) > /dev/null
  n=$(wrk -t1 -c10 -d${SECS}s "${args[@]}" $url | awk '/requests in/ {print $1}')
  callgrind_control -d $(cat $W/l.pid) > /dev/null
  # The dump just written (the exit writes another for what follows).
  local ir=$(awk '/^summary:|^totals:/ {print $2; exit}' "$(ls -t $W/cg.out* | head -1)")
  kill $(cat $W/l.pid); wait $(cat $W/l.pid) 2>/dev/null || true
  awk -v ir=$ir -v n=$n 'BEGIN {printf "%d requests, %.0f instructions/request", n, ir/n}'
}
for test in ${TESTS:-keepalive close tcp}; do
  for bin in "$@"; do
    echo "$test $(basename $bin): $(count $bin $test)"
  done
done
