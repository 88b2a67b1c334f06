#!/usr/bin/env bash
# Measures a migration between two `vfio-mig serve` processes on this machine, with the
# orchestrator (`vfio-mig migrate`) in its own process under /usr/bin/time -v, and the raw
# socket copy baselines (1 and 2 hops) in the same run. Not a test: numbers for the notes.
#
#   cargo build --release -p vfio-mig --bin vfio-mig --example raw_socket_copy
#   crates/cli/tests/measure-migration.sh [SIZE] [DIRTY_RATE] [DOWNTIME_LIMIT_MS] [RUNS]
#
# Defaults: 1G 32M 50 3. Extra `migrate` options come from MIGRATE_ARGS (for example
# MIGRATE_ARGS="--data-path messages" for the message data path). The destination is still (dirty-rate=0) so that its digest can be
# compared with the stopped source's afterwards.
set -euo pipefail
cd "$(dirname "$0")/../../.."
BIN=target/release/vfio-mig
RAW=target/release/examples/raw_socket_copy
SIZE=${1:-1G} RATE=${2:-32M} LIMIT=${3:-50} RUNS=${4:-3}
DIR=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
digest() { "$BIN" info --json "vfio-user:$1" | python3 -c \
  'import json,sys; d=json.load(sys.stdin); print(d["state"], d["membuf"]["digest"])'; }

for run in $(seq "$RUNS"); do
  rm -f "$DIR"/*.sock
  "$BIN" serve --socket "$DIR/a.sock" --device "membuf:size=$SIZE,dirty-rate=$RATE,seed=1" >/dev/null & A=$!
  "$BIN" serve --socket "$DIR/b.sock" --device "membuf:size=$SIZE,dirty-rate=0,seed=2" >/dev/null & B=$!
  PIDS=("$A" "$B")
  while [ ! -S "$DIR/a.sock" ] || [ ! -S "$DIR/b.sock" ]; do sleep 0.05; done
  a0=$(cpu "$A") b0=$(cpu "$B")
  # shellcheck disable=SC2086 # MIGRATE_ARGS is split on purpose
  /usr/bin/time -v "$BIN" migrate --downtime-limit "$LIMIT" --json ${MIGRATE_ARGS:-} \
    "vfio-user:$DIR/a.sock" "vfio-user:$DIR/b.sock" >"$DIR/migrate.json" 2>"$DIR/time.txt"
  a1=$(cpu "$A") b1=$(cpu "$B") tck=$(getconf CLK_TCK)
  src=$(digest "$DIR/a.sock") dst=$(digest "$DIR/b.sock")
  rss=$(awk '/Maximum resident/ {print $6}' "$DIR/time.txt")
  orch_cpu=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END {print u + s}' "$DIR/time.txt")
  tail -1 "$DIR/migrate.json" | python3 -c '
import json, sys
s = json.load(sys.stdin); src = s["source"]; dst = s["destination"]
pre = sum(d["pre_copy"]["bytes"] for d in src["devices"])
sc = sum(d["stop_copy"]["bytes"] for d in src["devices"])
print("migrate: total %.0f ms, precopy %d round(s) %.1f MiB in %.0f ms, stop-copy %.1f MiB in %.1f ms,"
      " downtime %.1f ms, %.0f MiB/s, destination validation %.1f ms"
      % (src["total_ms"], src["precopy_rounds"], pre / 2**20, src["precopy_ms"], sc / 2**20,
         src["stop_copy_ms"], src["downtime"]["ms"], src["throughput_bps"] / 2**20,
         dst["validation_ms"]))
p = s["data_path"]
print("  data path: %.1f MiB shared, %.1f MiB in messages (source + destination)"
      % ((p["source"]["shared_bytes"] + p["destination"]["shared_bytes"]) / 2**20,
         (p["source"]["message_bytes"] + p["destination"]["message_bytes"]) / 2**20))'
  awk -v r="$rss" -v o="$orch_cpu" -v a=$(((a1 - a0))) -v b=$(((b1 - b0))) -v t="$tck" 'BEGIN {
    printf "  orchestrator peak RSS %.1f MiB, CPU %.2f s; servers CPU %.2f s + %.2f s\n",
      r / 1024, o, a / t, b / t }'
  echo "  source $src; destination $dst"
  [ "${src#* }" = "${dst#* }" ] || { echo "  DIGESTS DIFFER"; exit 1; }
  kill "$A" "$B"; wait "$A" "$B" 2>/dev/null || true
  MIB=$(( $(numfmt --from=iec "$SIZE") >> 20 ))
  "$RAW" "$MIB" unix 1
  "$RAW" "$MIB" unix 2
done
