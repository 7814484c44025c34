#!/usr/bin/env bash
# Regenerates deploy/symbol-order.txt: the functions legate runs at start-up and
# on its request paths, which build.rs asks the linker (lld) to place first and
# together. The kernel maps code in 64 KiB windows around each page that runs,
# so code that runs scattered through the 8.4 MB .text keeps most of it
# resident; packed together it is ~2 MB, and grouped by phase an idle legate
# maps only its start-up group (1.4 MB). Measured: idle RSS 8.1 -> 5.5 MB at
# start; in benches/proxy_bench.sh peak 12.9 -> 10.0 MB, idle after it 5.7 MB.
# Trained on both tokio runtimes (one CPU runs the current-thread scheduler)
# and under concurrent load: peak 10.0-10.2 -> 8.9-9.1 MB, idle at start 5.1-5.4.
#
#   bash benches/pgo.sh build && bash benches/symbol-order.sh && bash benches/pgo.sh build
#
# Runs the release binary under callgrind (valgrind) on loopback, twice (with
# --threads 1 and sized from the CPUs): TCP, HTTP/1.1 (one at a time, then wrk)
# and h2c through legate to an nginx backend, the admin endpoints, a reload. The
# names are mangled and stable across edits of a function's body (with fat LTO:
# thin LTO adds a per-build suffix to some); a stale list only loses the effect
# for the functions renamed since (lld ignores names it does not find).
# Regenerate after dependency or compiler upgrades. Needs valgrind, nginx, wrk,
# curl (with HTTP/2), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
LEGATE=${LEGATE_BIN:-target/release/legate}
[ -x "$LEGATE" ] || { echo "build first: cargo build --release" >&2; exit 2; }
for t in valgrind wrk; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 2; }; done

W=$(mktemp -d); H=127.0.0.1
source benches/backend.sh
BACK=$H:$(port); TCP=$(port); HTTP=$(port); ADMIN=$(port)
start_backend $BACK

training_config $W/config
# train NAME [ARGS]: one callgrind run of the phases below, dumped to
# $W/NAME.1, .2, .3 and $W/NAME at exit.
train() {
  local name=$1; shift
  valgrind --tool=callgrind --demangle=no --callgrind-out-file=$W/$name \
    "$LEGATE" --config $W/config --admin $H:$ADMIN --log warn "$@" > $W/legate.log 2>&1 &
  echo $! > $W/legate.pid
  wait_ready 60
  sleep 2  # health probes and the timers an idle legate runs
  # Each phase is dumped on its own (callgrind zeroes after a dump), so the list
  # is grouped: start-up and idle, then HTTP/1.1 and TCP requests, then h2c, then
  # the admin endpoints and a reload. An idle legate touches only the first group.
  callgrind_control -d "$(cat $W/legate.pid)" > /dev/null
  for _ in $(seq 30); do
    curl -s -o /dev/null http://$H:$HTTP/api/x
    curl -s -o /dev/null http://$H:$HTTP/
    curl -s -o /dev/null -H 'Connection: close' http://$H:$HTTP/
    curl -s -o /dev/null http://$H:$TCP/
  done
  # Concurrent clients take paths one at a time does not: a pool of upstream
  # connections, sockets not ready, clients that leave mid-connection (wrk's end).
  wrk -t1 -c20 -d2s http://$H:$HTTP/ > /dev/null
  wrk -t1 -c20 -d2s -H 'Connection: close' http://$H:$HTTP/ > /dev/null
  wrk -t1 -c20 -d2s http://$H:$TCP/ > /dev/null
  callgrind_control -d "$(cat $W/legate.pid)" > /dev/null
  for _ in $(seq 10); do curl -s -o /dev/null --http2-prior-knowledge http://$H:$HTTP/api/y; done
  callgrind_control -d "$(cat $W/legate.pid)" > /dev/null
  for path in / /metrics /config /healthz; do curl -s -o /dev/null http://$H:$ADMIN$path; done
  sed -i 's/timeout: 5s/timeout: 6s/' $W/config/legate.yaml
  curl -s -o /dev/null -X POST http://$H:$ADMIN/reload
  curl -s -o /dev/null http://$H:$HTTP/api/z
  sed -i 's/timeout: 6s/timeout: 5s/' $W/config/legate.yaml
  stop_legate
}
# Start-up sizes the runtime from the CPUs: one CPU (a sidecar's usual limit)
# runs tokio's current-thread scheduler, more its multi-thread one. Both are
# trained, so either finds its code in the groups.
train one --threads 1
train many
# The functions of legate's own object, phase by phase (NAME.1, .2, .3, then
# the dump at exit; each phase of both runs), each in the order callgrind first names them.
python3 - "$(basename "$LEGATE")" $W/one.1 $W/many.1 $W/one.2 $W/many.2 $W/one.3 $W/many.3 $W/one $W/many > deploy/symbol-order.txt <<'PY'
import re, sys
pat = re.compile(r'^(ob|cob|fn|cfn)=\((\d+)\)(?: (.*))?$')
seen = set()
for path in sys.argv[2:]:
    objects, names, owner, order = {}, {}, {}, []
    ob = cob = None
    for line in open(path, errors='replace'):
        m = pat.match(line.rstrip('\n'))
        if not m:
            continue
        kind, i, name = m.groups()
        if kind in ('ob', 'cob'):
            if name:
                objects[i] = name
            if kind == 'ob':
                ob, cob = i, None
            else:
                cob = i
            continue
        if name:
            names[i] = name
        if i not in owner:
            owner[i] = ob if kind == 'fn' else (cob or ob)
            order.append(i)
        if kind == 'cfn':
            cob = None
    ours = {i for i, p in objects.items() if p.endswith('/' + sys.argv[1])}
    before = len(seen)
    for i in order:
        # Callgrind marks a recursive call's frames name'2, name'3: one function.
        name = re.sub(r"'\d+$", '', names.get(i, ''))
        # Skip valgrind's pseudo-entries ('(below main)') and unnamed code ('0x...').
        if owner[i] in ours and name and ' ' not in name and not name.startswith('0x') and name not in seen:
            seen.add(name)
            print(name)
    print(f'{path.rsplit("/", 1)[-1]}: {len(seen) - before} more functions', file=sys.stderr)
PY
echo "deploy/symbol-order.txt: $(wc -l < deploy/symbol-order.txt) functions"
