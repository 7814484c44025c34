# Shared by the example scripts: the legate binary, free ports, waiting,
# a kubelet-style ConfigMap directory, and cleanup of everything started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ -z "${LEGATE_BIN:-}" ]; then
  cargo build --release --quiet
  LEGATE_BIN=target/release/legate
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "${CLEANUP_EXTRA:-}" ] && eval "$CLEANUP_EXTRA"
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

# A TCP port free on 127.0.0.1 right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for DESCRIPTION COMMAND...: retries for up to 10 s.
wait_for() {
  local what=$1; shift
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  fail "timed out waiting for $what"
}

# configmap_init DIR FILE: a kubelet-style ConfigMap volume with one key.
configmap_init() {
  local dir=$1 file=$2 ts="..$(date +%s%N)"
  mkdir -p "$dir/$ts"; cp "$file" "$dir/$ts/legate.yaml"
  ln -s "$ts" "$dir/..data"; ln -s ..data/legate.yaml "$dir/legate.yaml"
}

# configmap_swap DIR FILE: the kubelet's atomic update (new dir, ..data_tmp, rename).
configmap_swap() {
  local dir=$1 file=$2 ts="..$(date +%s%N)" old
  old=$(readlink "$dir/..data")
  mkdir -p "$dir/$ts"; cp "$file" "$dir/$ts/legate.yaml"
  ln -s "$ts" "$dir/..data_tmp"; mv -T "$dir/..data_tmp" "$dir/..data"
  rm -rf "${dir:?}/$old"
}

# start_legate CONFIG_DIR ADMIN_PORT [args...]
start_legate() {
  local dir=$1 admin=$2; shift 2
  "$LEGATE_BIN" --config "$dir" --admin "127.0.0.1:$admin" --shutdown-delay 0s --log-format text "$@" \
    > "$WORK/legate.log" 2>&1 &
  PIDS+=($!)
  wait_for "legate ready" curl -fs "http://127.0.0.1:$admin/readyz"
}

metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
