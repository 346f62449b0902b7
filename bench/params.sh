#!/usr/bin/env bash
# Parameter store reads: decrypted, audited `GetParameter`-style reads through the API
# (`GET /v1/param?name=...&decrypt=true`: token check, policy check, two store reads, the data
# key and the value opened with AES-256-GCM, an audit record fsynced before the answer), with
# CONNECTIONS concurrent keep-alive clients (wrk, closed loop, as the published OpenBao figure
# was taken with 32 workers). The same server's `/healthz` in the same run is the HTTP floor.
# Afterwards the audit trail must hold one record per read answered, and its chain must hold.
#
# Usage: bench/params.sh [SECONDS] [CONNECTIONS]        (default 10 s, 32 connections)
#   PIN=1: the server on core 0 and wrk on core 1 (default: both share the two cores)
# Peer figure (published, not run here: OpenBao is not packaged in Debian): OpenBao KV v2,
# about 27k reads/s at 1.1 ms mean latency with 32 workers.
# Last line: param_reads_per_s=N param_p99_ms=M   (goal: N >= 30000 and M < 2)
set -euo pipefail

SECONDS_EACH=${1:-10}
CONNECTIONS=${2:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y wrk curl)" >&2; exit 1; }
done
cargo build --release --quiet --bin dozen
BIN="$ROOT/target/release/dozen"

WORK=$(mktemp -d /tmp/dozen-params-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export DOZEN_DATA_DIR="$WORK/data" DOZEN_SERVER="http://127.0.0.1:$PORT"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

SERVER_CPU=() WRK_CPU=()
if [ "${PIN:-0}" = 1 ]; then SERVER_CPU=(taskset -c 0) WRK_CPU=(taskset -c 1); fi
"${SERVER_CPU[@]}" "$BIN" server --listen "127.0.0.1:$PORT" --no-agent --no-proxy --log warn \
  >>"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do curl -sf "$DOZEN_SERVER/healthz" >/dev/null && break; sleep 0.1; done

# A 1 KiB SecureString, and a token that may read it (not the admin token: the policy check
# is part of what is measured).
head -c 768 /dev/urandom | base64 -w0 | "$BIN" param put /bench/db/password --secure >/dev/null
TOKEN=$("$BIN" token create bench --policy 'read:/bench/*')
RECORDS_BEFORE=$("$BIN" audit -n 10000 -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')

# wrk prints its latency distribution with --latency; the figures are taken from it.
run() {
  "${WRK_CPU[@]}" wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_EACH}s" --latency -H "authorization: Bearer $TOKEN" "$1"
}
to_ms() { python3 -c "
import sys
v=sys.argv[1]
for unit,f in (('us',0.001),('ms',1.0),('s',1000.0)):
    if v.endswith(unit): print(round(float(v[:-len(unit)])*f,3)); break
" "$1"; }
parse() { # wrk output -> "reqs_per_s p50_ms p99_ms requests"
  local out=$1
  local rps p50 p99 n
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $n"
}

FLOOR=$(parse "$(run "$DOZEN_SERVER/healthz")")
READS_OUT=$(run "$DOZEN_SERVER/v1/param?name=/bench/db/password&decrypt=true")
if grep -q "Non-2xx" <<<"$READS_OUT"; then
  echo "some reads failed:" >&2; echo "$READS_OUT" >&2; exit 1
fi
READS=$(parse "$READS_OUT")
read -r FLOOR_RPS FLOOR_P50 FLOOR_P99 _ <<<"$FLOOR"
read -r READ_RPS READ_P50 READ_P99 READ_N <<<"$READS"

# Every read answered left its record, and the chain holds.
RECORDS_AFTER=$(ls "$WORK"/data/audit/*.log | xargs cat | wc -l)
"$BIN" audit verify >/dev/null || { echo "the audit chain does not verify" >&2; exit 1; }
AUDITED=$((RECORDS_AFTER - RECORDS_BEFORE))
if [ "$AUDITED" -lt "$READ_N" ]; then
  echo "only $AUDITED audit records for $READ_N reads answered" >&2; exit 1
fi

printf '%-34s %12s %10s %10s\n' "" "req/s" "p50 ms" "p99 ms"
printf '%-34s %12.0f %10s %10s\n' "GET /healthz (HTTP floor)" "$FLOOR_RPS" "$FLOOR_P50" "$FLOOR_P99"
printf '%-34s %12.0f %10s %10s\n' "decrypted, audited GetParameter" "$READ_RPS" "$READ_P50" "$READ_P99"
printf '%-34s %12s %10s %10s\n' "OpenBao KV v2 (published)" "~27000" "1.1 mean" "-"
echo "reads answered: $READ_N; audit records written meanwhile: $AUDITED (one per read; the rest are wrk's cut-off requests)"
python3 -c "print('ratio to the HTTP floor: %.2f; to OpenBao\'s published figure: %.2f' % ($READ_RPS/$FLOOR_RPS, $READ_RPS/27000))"
echo "param_reads_per_s=$(printf '%.0f' "$READ_RPS") param_p99_ms=$READ_P99"
