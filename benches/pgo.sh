#!/usr/bin/env bash
# Profile-guided optimisation: regenerates deploy/legate.profdata, the branch
# and call counts of legate's request paths, which release builds hand to
# rustc (-Cprofile-use) so LLVM lays out and inlines for the paths that run.
#
#   bash benches/pgo.sh            # instrumented build, training run, merge
#   bash benches/pgo.sh build      # cargo build --release with the profile
#
# The training runs drive an instrumented legate (target/pgo-gen), once with
# --threads 1 and once sized from the CPUs, on loopback
# behind an nginx `return 200` backend: HTTP/1.1 keep-alive and a new
# connection per request (wrk), a TCP listener (wrk through it), h2c (h2load)
# and the admin endpoints. The profile matches one rustc (its LLVM) and one
# Cargo.lock: the Dockerfile pins rust:1.95, and functions changed since the
# profile was taken are just built without it (no error). Needs the
# llvm-tools rustup component (llvm-profdata), nginx, wrk, h2load, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=deploy/legate.profdata

if [ "${1:-}" = build ]; then
  # Cargo does not watch the profile, only RUSTFLAGS: naming the copy by its
  # hash rebuilds every crate when the profile changes.
  USE=target/pgo-use/$(sha256sum $PROFILE | cut -c1-16).profdata
  # Copied once: rustc lists the profile among its inputs, a new mtime rebuilds.
  mkdir -p target/pgo-use; [ -f $USE ] || cp $PROFILE $USE
  # Warnings for functions edited since the profile was taken are expected.
  RUSTFLAGS="-Cprofile-use=$PWD/$USE -Cllvm-args=-no-pgo-warn-mismatch" \
    exec cargo build --release --locked --bin legate
fi

PROFDATA=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1)
[ -x "$PROFDATA" ] || { echo "needs llvm-profdata: rustup component add llvm-tools" >&2; exit 2; }
for t in nginx wrk h2load curl; do command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }; done

W=$(mktemp -d); H=127.0.0.1
source benches/backend.sh
BACK=$H:$(port); TCP=$(port); HTTP=$(port); ADMIN=$(port)
start_backend $BACK

RUSTFLAGS="-Cprofile-generate=$PWD/target/pgo-gen/raw" cargo build --release --locked --bin legate --target-dir target/pgo-gen

training_config $W/config
# train [ARGS]: one instrumented run under the load below; each run writes its
# own raw profile (%p), and the merge adds them.
train() {
  LLVM_PROFILE_FILE="$W/raw/legate-%p-%m.profraw" target/pgo-gen/release/legate \
    --config $W/config --admin $H:$ADMIN --log warn "$@" > $W/legate.log 2>&1 &
  echo $! > $W/legate.pid
  wait_ready 10

  # Weighted like benches/proxy_bench.sh: mostly HTTP/1.1 requests.
  wrk -t1 -c50 -d10s http://$H:$HTTP/ > /dev/null
  wrk -t1 -c50 -d3s http://$H:$HTTP/api/x > /dev/null
  wrk -t1 -c20 -d5s -H 'Connection: close' http://$H:$HTTP/ > /dev/null
  wrk -t1 -c20 -d5s -H 'Connection: close' http://$H:$TCP/ > /dev/null
  h2load -c4 -m10 -D 3 http://$H:$HTTP/api/h2 > /dev/null
  for path in / /metrics /config /healthz; do curl -s -o /dev/null http://$H:$ADMIN$path; done
  # The profile is written at exit.
  stop_legate
}
# Start-up sizes the runtime from the CPUs: one CPU (a sidecar's usual limit,
# and the bench's --threads 1) runs tokio's current-thread scheduler, more its
# multi-thread one. Trained on one only, the other's code counts as cold.
train --threads 1
train

# Sparse: functions that never ran are left out (7.3 MB -> 0.8 MB).
"$PROFDATA" merge -sparse -o $PROFILE $W/raw/*.profraw
echo "$PROFILE: $(du -h $PROFILE | cut -f1); build with: bash benches/pgo.sh build"
