#!/usr/bin/env bash
# Regenerates deploy/symbol-order.txt: the functions legate runs at start-up and
# on its request paths, which build.rs asks the linker (lld) to place first and
# together. The kernel maps code in 64 KiB windows around each page that runs,
# so code that runs scattered through the 8.6 MB .text keeps most of it
# resident; packed together it is ~2 MB. Measured: idle RSS 8.1 -> 6.5 MB at
# start, 9.2 -> 7.1 MB after benches/proxy_bench.sh's load, peak 12.9 -> 11.1 MB.
#
#   cargo build --release && bash benches/symbol-order.sh
#
# Runs the release binary under callgrind (valgrind) on loopback: TCP, HTTP/1.1
# and h2c through legate to an nginx backend, the admin endpoints, a reload. The
# names are mangled and stable across edits of a function's body; a stale list
# only loses the effect for the functions renamed since (lld ignores names it
# does not find). Regenerate after dependency upgrades. Needs valgrind, nginx,
# curl (with HTTP/2), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
LEGATE=${LEGATE_BIN:-target/release/legate}
[ -x "$LEGATE" ] || { echo "build first: cargo build --release" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 2; }

W=$(mktemp -d); H=127.0.0.1
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACK=$H:$(port); TCP=$(port); HTTP=$(port); ADMIN=$(port)
source benches/backend.sh
start_backend $BACK

mkdir -p $W/config
cat > $W/config/legate.yaml <<YAML
listeners:
  - { name: tcp, listen: "$H:$TCP", cluster: backend }
  - name: http
    listen: "$H:$HTTP"
    protocol: http
    routes:
      - { name: api, match: { path_prefix: /api/ }, cluster: backend, timeout: 5s }
      - { name: rest, cluster: backend }
clusters:
  - { name: backend, endpoints: [ "$BACK" ], health: { interval: 1s, http_path: / } }
YAML
valgrind --tool=callgrind --demangle=no --callgrind-out-file=$W/callgrind.out \
  "$LEGATE" --config $W/config --admin $H:$ADMIN --threads 2 --log warn > $W/legate.log 2>&1 &
echo $! > $W/legate.pid
for _ in $(seq 300); do curl -fs http://$H:$ADMIN/readyz >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs http://$H:$ADMIN/readyz >/dev/null || { cat $W/legate.log >&2; exit 1; }

for _ in $(seq 30); do
  curl -s -o /dev/null http://$H:$HTTP/api/x
  curl -s -o /dev/null http://$H:$HTTP/
  curl -s -o /dev/null --http2-prior-knowledge http://$H:$HTTP/api/y
  curl -s -o /dev/null http://$H:$TCP/
done
for path in / /metrics /config /healthz; do curl -s -o /dev/null http://$H:$ADMIN$path; done
sed -i 's/timeout: 5s/timeout: 6s/' $W/config/legate.yaml
curl -s -o /dev/null -X POST http://$H:$ADMIN/reload
curl -s -o /dev/null http://$H:$HTTP/api/z
kill -TERM "$(cat $W/legate.pid)"
for _ in $(seq 100); do kill -0 "$(cat $W/legate.pid)" 2>/dev/null || break; sleep 0.2; done

# The functions of legate's own object, in the order callgrind first names them.
python3 - $W/callgrind.out "$(basename "$LEGATE")" > deploy/symbol-order.txt <<'PY'
import re, sys
pat = re.compile(r'^(ob|cob|fn|cfn)=\((\d+)\)(?: (.*))?$')
objects, names, owner, order = {}, {}, {}, []
ob = cob = None
for line in open(sys.argv[1], errors='replace'):
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
ours = {i for i, path in objects.items() if path.endswith('/' + sys.argv[2])}
seen = set()
for i in order:
    name = names.get(i, '')
    # Skip valgrind's pseudo-entries ('(below main)') and unnamed code ('0x...').
    if owner[i] in ours and name and ' ' not in name and not name.startswith('0x') and name not in seen:
        seen.add(name)
        print(name)
PY
echo "deploy/symbol-order.txt: $(wc -l < deploy/symbol-order.txt) functions"
