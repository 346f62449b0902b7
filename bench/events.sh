#!/usr/bin/env bash
# Event retention under a crash loop: REPLICAS tasks that exit at once, restarted with backoff
# for MINUTES; once a minute, how many events the service keeps (the bound is 200 per subject,
# trimmed once 20 over) and how many restarts happened. Bounded: the run ends after MINUTES.
#
# Usage: bench/events.sh [MINUTES] [REPLICAS]     (default 10 minutes, 10 replicas)
# Last line: events_kept_max=N events_kept_end=M restarts=R minutes=T
#   goal: N <= 220 however many restarts
set -euo pipefail

MINUTES=${1:-10}
REPLICAS=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --quiet --bin dozen
BIN="$ROOT/target/release/dozen"

WORK=$(mktemp -d /tmp/dozen-events.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DOZEN_DATA_DIR="$WORK/data" DOZEN_SERVER="http://127.0.0.1:$PORT"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    "$BIN" down >/dev/null 2>&1 || true
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" server --listen "127.0.0.1:$PORT" --no-proxy --port-range 43000-43999 --log warn \
  >>"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do curl -sf "$DOZEN_SERVER/healthz" >/dev/null && break; sleep 0.1; done

cat >"$WORK/dozen.toml" <<EOF
name = "crashloop"
[services.crasher]
command = "echo 'about to fail' >&2; exit 3"
port = false
replicas = $REPLICAS
EOF
"$BIN" apply -f "$WORK/dozen.toml" --no-wait >/dev/null

count() { "$BIN" events crasher -o json | wc -l; }
restarts() {
  "$BIN" ps -o json | python3 -c 'import json,sys; print(sum(t.get("restarts",0) for t in json.load(sys.stdin)["tasks"]))'
}
MAX=0
for minute in $(seq "$MINUTES"); do
  sleep 60
  KEPT=$(count)
  [ "$KEPT" -gt "$MAX" ] && MAX=$KEPT
  echo "minute $minute: $KEPT events kept, $(restarts) restarts so far"
done
KEPT=$(count)
echo "events_kept_max=$MAX events_kept_end=$KEPT restarts=$(restarts) minutes=$MINUTES"
