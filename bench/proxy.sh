#!/usr/bin/env bash
# Proxy capacity: dozen's proxy beside nginx and HAProxy in one run, each pinned to core 0, with
# the same backend (nginx, one worker, a fixed body) and the load generator (wrk, 50
# connections) on core 1; keep-alive to the backend everywhere; nginx and HAProxy write an
# access log (dozen has none yet). ROUNDS rounds (default 3), the order rotating each round;
# req/s and the proxy's CPU time per request (from /proc) for each.
#
# Then latency, open loop (dozen-loadgen: requests due at a fixed rate, each timed from when it
# was due), at 50 % and 80 % of nginx's median capacity: the backend alone, then each proxy;
# the p50 and p99 each proxy adds over the backend alone.
#
# Usage: bench/proxy.sh [ROUNDS] [SECONDS]   (LATENCY_SECONDS: each latency run, default 8)
#   PROFILE=1: a perf profile (cpu-clock) of dozen's proxy during its first round
#   (PROFILE_OUT=FILE keeps its perf.data)
#   DOZEN_PROXY_ENV="K=V ...": environment for dozen's proxy (an experiment, e.g.
#   TOKIO_WORKER_THREADS=1)
# Last line: proxy_ratio_vs_nginx=X proxy_ratio_vs_haproxy=Y p99_added_ratio_vs_best=Z
#   X, Y = dozen's median req/s over nginx's / HAProxy's (goal >= 1.1 each)
#   Z = the p99 dozen adds at 80 % over the lower of nginx's and HAProxy's (goal <= 1.0)
set -euo pipefail

ROUNDS=${1:-3}
SECONDS_EACH=${2:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
for tool in nginx haproxy wrk taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y nginx haproxy wrk)" >&2; exit 1; }
done
cargo build --release --quiet --bin dozen --bin dozen-loadgen
BIN="$ROOT/target/release/dozen"
LOADGEN="$ROOT/target/release/dozen-loadgen"

WORK=$(mktemp -d /tmp/dozen-proxy-bench.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API=$(free_port); DOZEN=$(free_port); DOZEN_INTERNAL=$(free_port)
NGINX=$(free_port); HAPROXY=$(free_port)
export DOZEN_DATA_DIR="$WORK/data" DOZEN_SERVER="http://127.0.0.1:$API"
PIDS=()

cleanup() {
  set +e
  "$BIN" down bench >/dev/null 2>&1
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The backend: nginx, one worker, on core 1, a fixed body. dozen's proxy sends only to a
# service's tasks, so the backend runs as the task of a service (nginx on its $PORT), and
# nginx and HAProxy proxy to that same task's port.
mkdir -p "$WORK/backend" "$WORK/nginx" "$WORK/haproxy"
cat >"$WORK/backend/task.conf.tmpl" <<EOF
worker_processes 1;
daemon off;
pid $WORK/task-nginx.pid;
error_log $WORK/backend/task-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:PORT; location / { return 200 "hello from the backend\n"; } }
}
EOF
# dozen: the control plane (no proxy in it) and its agent on core 1; dozen's proxy alone on
# core 0.
taskset -c 1 "$BIN" server --listen "127.0.0.1:$API" --no-proxy --port-range 44100-44199 \
  --task-user root --log warn >>"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "$DOZEN_SERVER/healthz" >/dev/null && break; sleep 0.1; done
cat >"$WORK/dozen.toml" <<EOF
name = "bench"
[services.backend]
command = ["sh", "-c", "sed s/PORT/\$PORT/ $WORK/backend/task.conf.tmpl > $WORK/backend/task.conf && exec taskset -c 1 nginx -c $WORK/backend/task.conf -p $WORK/backend"]
[[services.backend.routes]]
path = "/"
EOF
"$BIN" apply -f "$WORK/dozen.toml" --timeout 60s >/dev/null
TASK_PORT=$("$BIN" ps -o json | python3 -c 'import json,sys; print([t for t in json.load(sys.stdin)["tasks"] if t["service"]=="backend"][0]["status"]["host_port"])')
cp "$WORK/data/token" "$WORK/token"
env ${DOZEN_PROXY_ENV:-} taskset -c 0 "$BIN" proxy --token-file "$WORK/token" --id bench \
  --proxy-listen "127.0.0.1:$DOZEN" --proxy-internal-listen "127.0.0.1:$DOZEN_INTERNAL" \
  --log warn >>"$WORK/proxy.log" 2>&1 &
DOZEN_PID=$!
PIDS+=($DOZEN_PID)

# nginx as a proxy: one worker on core 0, keep-alive upstream, an access log.
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx/access.log;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$TASK_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
taskset -c 0 nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -g "daemon off;" &
NGINX_PID=$!
PIDS+=($NGINX_PID)

# HAProxy: one thread on core 0, connection reuse, an access log (to a file through stdout).
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
  log stdout format raw local0
defaults
  mode http
  log global
  option httplog
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY
  default_backend be
backend be
  server b1 127.0.0.1:$TASK_PORT
EOF
taskset -c 0 haproxy -f "$WORK/haproxy/haproxy.cfg" -db >"$WORK/haproxy/access.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)

for port in $DOZEN $NGINX $HAPROXY; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/" | grep -q "hello from the backend" || { echo "no answer through port $port" >&2; exit 1; }
done

# CPU ticks of a process and its children (nginx's work is in its worker).
cpu_ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1"); do
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

declare -A RPS
measure() { # name port pid
  local before after out rps
  before=$(cpu_ticks "$3")
  local perf_pid=""
  if [ -n "${PROFILE:-}" ] && [ "$1" = dozen ] && [ ! -f "$WORK/perf.data" ]; then
    perf record -q -e cpu-clock -F 2999 -g -p "$3" -o "$WORK/perf.data" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  out=$(taskset -c 1 wrk -t1 -c50 -d"${SECONDS_EACH}s" "http://127.0.0.1:$2/")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
    [ -n "${PROFILE_OUT:-}" ] && cp "$WORK/perf.data" "$PROFILE_OUT"
    echo "  where dozen's proxy spends its time (perf, cpu-clock, self):"
    perf report -i "$WORK/perf.data" --stdio --no-children --sort symbol 2>/dev/null \
      | grep -E '^ +[0-9.]+%' | head -25 | sed -e 's/  */ /g' -e 's/^/    /' | cut -c1-110
  fi
  after=$(cpu_ticks "$3")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local requests
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  local us
  us=$(python3 -c "print(round(($after - $before) / $HZ / max($requests, 1) * 1e6, 1))")
  echo "  $1: ${rps} req/s, ${us} us CPU per request"
  RPS[$1]="${RPS[$1]:-} $rps"
}

names=(dozen nginx haproxy)
ports=($DOZEN $NGINX $HAPROXY)
pids=($DOZEN_PID $NGINX_PID $HAPROXY_PID)
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS"
  for k in 0 1 2; do
    i=$(( (k + round) % 3 ))
    measure "${names[$i]}" "${ports[$i]}" "${pids[$i]}"
  done
done

NGINX_CAPACITY=$(python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' ${RPS[nginx]})

# Latency, open loop: the backend alone first at each rate, then each proxy, rotating.
declare -A LAT
names=(backend dozen nginx haproxy)
ports=($TASK_PORT $DOZEN $NGINX $HAPROXY)
for share in 50 80; do
  rate=$(python3 -c "print(int($NGINX_CAPACITY * $share / 100))")
  echo "latency at $share % of nginx's capacity ($rate req/s, ${LATENCY_SECONDS:-8} s, 50 connections):"
  for k in 0 1 2 3; do
    i=$(( k == 0 ? 0 : 1 + (k - 1 + share / 10) % 3 ))
    out=$(taskset -c 1 "$LOADGEN" "http://127.0.0.1:${ports[$i]}/" "$rate" "${LATENCY_SECONDS:-8}" 50)
    echo "  ${names[$i]}: $out"
    LAT[${names[$i]}_$share]="$out"
  done
done

python3 - "${RPS[dozen]}" "${RPS[nginx]}" "${RPS[haproxy]}" \
  "${LAT[backend_50]}" "${LAT[dozen_50]}" "${LAT[nginx_50]}" "${LAT[haproxy_50]}" \
  "${LAT[backend_80]}" "${LAT[dozen_80]}" "${LAT[nginx_80]}" "${LAT[haproxy_80]}" <<'EOF'
import statistics, sys
d, n, h = ([float(x) for x in a.split()] for a in sys.argv[1:4])
md, mn, mh = statistics.median(d), statistics.median(n), statistics.median(h)
lat = [dict(kv.split("=") for kv in a.split()) for a in sys.argv[4:12]]
print(f"\nmedian req/s: dozen {md:.0f}, nginx {mn:.0f}, haproxy {mh:.0f}")
z = None
for k, share in enumerate((50, 80)):
    backend, rest = lat[4 * k], lat[4 * k + 1 : 4 * k + 4]
    added = {}
    parts = []
    for name, l in zip(("dozen", "nginx", "haproxy"), rest):
        a50 = int(l["p50_us"]) - int(backend["p50_us"])
        a99 = int(l["p99_us"]) - int(backend["p99_us"])
        added[name] = a99
        parts.append(f"{name} {a50} / {a99} (errors {l['errors']})")
    print(f"added at {share} %, us p50 / p99 (backend alone {backend['p50_us']} / {backend['p99_us']}): " + ", ".join(parts))
    if share == 80:
        z = max(added["dozen"], 1) / max(min(added["nginx"], added["haproxy"]), 1)
print(f"proxy_ratio_vs_nginx={md / mn:.2f} proxy_ratio_vs_haproxy={md / mh:.2f} p99_added_ratio_vs_best={z:.2f}")
EOF
