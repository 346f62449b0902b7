#!/usr/bin/env bash
# Restart convergence: 100 small tasks run, the server (with its in-process agent) is killed
# with SIGKILL and started again; we measure the time until every task is reported running
# and re-adopted by the new agent (same pid: nothing started twice), and the resident memory
# of the shims that keep the tasks alive.
#
# Usage: bench/converge.sh [TASKS]        (default 100; bounded: every wait has a deadline)
# Last line: restart_converge_ms=N readopted=K shim_rss_kib=M
#   goals: N <= 2000, K = TASKS, M <= 2048 (the largest shim's VmRSS)
set -euo pipefail

TASKS=${1:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --quiet --bin dozen --bin dozen-testapp
BIN="$ROOT/target/release/dozen"
APP="$ROOT/target/release/dozen-testapp"

WORK=$(mktemp -d /tmp/dozen-converge.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DOZEN_DATA_DIR="$WORK/data" DOZEN_SERVER="http://127.0.0.1:$PORT"
SERVER_PID=""

cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill -9 "$SERVER_PID" 2>/dev/null || true
    # Reaped here, quietly: else bash reports "Killed" after the figures.
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  # Tasks outlive the server by design: end every shim and task this run started.
  for f in "$WORK"/data/agent/tasks/*/task.pid; do
    [ -f "$f" ] && kill -9 -- "-$(cut -d' ' -f1 "$f")" 2>/dev/null || true
  done
  for f in "$WORK"/data/agent/tasks/*/shim.pid; do
    [ -f "$f" ] && kill -9 "$(cut -d' ' -f1 "$f")" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_server() {
  "$BIN" server --listen "127.0.0.1:$PORT" --port-range 42000-42999 --log warn \
    >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
}

cat >"$WORK/dozen.toml" <<EOF
name = "converge"
[services.app]
command = ["$APP"]
replicas = $TASKS
[services.app.health]
http = "/healthz"
interval = "1s"
timeout = "500ms"
[services.app.resources]
cpu = "10m"
memory = "16MiB"
EOF

start_server
for _ in $(seq 100); do curl -sf "$DOZEN_SERVER/healthz" >/dev/null && break; sleep 0.1; done
echo "starting $TASKS tasks..."
"$BIN" apply -f "$WORK/dozen.toml" --timeout 120s >/dev/null

snapshot() { "$BIN" ps -o json; }
snapshot >"$WORK/before.json"
python3 - "$WORK/before.json" "$TASKS" <<'EOF'
import json, sys
ps = json.load(open(sys.argv[1]))
running = [t for t in ps["tasks"] if (t.get("status") or {}).get("state") == "running"]
assert len(running) == int(sys.argv[2]), f"expected {sys.argv[2]} running, got {len(running)}"
EOF

echo "killing the server with SIGKILL and starting it again..."
T0=$(date +%s%3N)
kill -9 "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
start_server

# Poll until every task is running under the new agent, re-adopted (bounded: 60 s).
READOPTED=0
CONVERGED=""
DEADLINE=$((T0 + 60000))
while [ "$(date +%s%3N)" -lt "$DEADLINE" ]; do
  if snapshot >"$WORK/after.json" 2>/dev/null; then
    RESULT=$(python3 - "$WORK/before.json" "$WORK/after.json" "$TASKS" <<'EOF'
import json, sys
before = {t["task"]: (t.get("status") or {}).get("pid") for t in json.load(open(sys.argv[1]))["tasks"]}
ps = json.load(open(sys.argv[2]))
old_instance = None
tasks = ps["tasks"]
ok = [t for t in tasks
      if (t.get("status") or {}).get("state") == "running"
      and t["status"].get("adopted")
      and t["status"].get("pid") == before.get(t["task"])]
print(len(ok), "yes" if len(ok) == int(sys.argv[3]) == len(tasks) else "no")
EOF
)
    READOPTED=${RESULT% *}
    if [ "${RESULT#* }" = "yes" ]; then CONVERGED=$(date +%s%3N); break; fi
  fi
  sleep 0.02
done
if [ -z "$CONVERGED" ]; then
  echo "did not converge within 60 s (re-adopted $READOPTED of $TASKS)" >&2
  CONVERGED=$(date +%s%3N)
fi
CONVERGE_MS=$((CONVERGED - T0))

# Resident memory of the shims (the largest, and the mean).
SHIM_RSS=$(for f in "$WORK"/data/agent/tasks/*/shim.pid; do
  pid=$(cut -d' ' -f1 "$f"); awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true
done | sort -n | awk '{a[NR]=$1; s+=$1} END {printf "%d %d", a[NR], s/NR}')
SHIM_MAX=${SHIM_RSS% *}
SHIM_MEAN=${SHIM_RSS#* }
TASK_RSS=$(for f in "$WORK"/data/agent/tasks/*/task.pid; do
  pid=$(cut -d' ' -f1 "$f"); awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true
done | awk '{s+=$1} END {printf "%d", s/NR}')

echo
echo "tasks:                 $TASKS"
echo "restart to converged:  ${CONVERGE_MS} ms (goal <= 2000)"
echo "re-adopted, same pid:  $READOPTED / $TASKS"
echo "shim VmRSS:            max ${SHIM_MAX} KiB, mean ${SHIM_MEAN} KiB (goal <= 2048); a task (the test app) averages ${TASK_RSS} KiB"
echo "restart_converge_ms=$CONVERGE_MS readopted=$READOPTED shim_rss_kib=$SHIM_MAX"
