#!/usr/bin/env bash
# Container start: from the request to the first successful HTTP answer, one small image
# (the static test app FROM scratch), for
#   - dozen:       `dozen apply --no-wait` of a new service -> answered through dozen's proxy;
#                  the image comes from dozen's own registry, pinned by digest, as users run it;
#   - Swarm:       `docker service create --detach` (host-mode publish: the routing mesh needs
#                  IPVS, which this kernel lacks) -> answered on the task's published port;
#   - docker run:  `docker run -d -p` -> answered on the published port (the floor);
#   - and, for the record (not in the ratios), `docker run -d --network host`: the floor for
#     the way dozen runs containers (on the node's network, as its processes do).
# RUNS runs each (default 20), the three alternating in a rotating order. The clock starts as
# the command is issued; once it returns, one shared poller makes a new attempt every 5 ms,
# each on its own connection, until the first good answer. (Polling a published port before
# the container's network is up costs about a second: the engine's port proxy connects to an
# address whose neighbour entry is not resolved yet, and the kernel retries ARP after 1 s. So
# no poll starts before the command that asked for the container has returned.) Every wait is bounded (30 s per start).
#
# Usage: bench/container-start.sh [RUNS]
# Last line: container_start_ratio_vs_swarm=X container_start_ratio_vs_docker_run=Y
#   X = Swarm's median / dozen's (goal >= 1.5); Y = dozen's median / docker run's (goal <= 1.3)
set -euo pipefail

RUNS=${1:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --release --quiet --bin dozen
BIN="$ROOT/target/release/dozen"

# The image: the static test app, FROM scratch (the engine here can pull nothing).
TRIPLE="$(uname -m)-unknown-linux-gnu"
STATIC_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/cluster-image"
CARGO_TARGET_DIR="$STATIC_TARGET" RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_DEV_DEBUG=0 \
  cargo build --quiet --target "$TRIPLE" -p dozen --bin dozen-testapp
WORK=$(mktemp -d /tmp/dozen-container-start.XXXXXX)
mkdir -p "$WORK/image"
cp "$STATIC_TARGET/$TRIPLE/debug/dozen-testapp" "$WORK/image/testapp"
printf 'FROM scratch\nCOPY testapp /testapp\nENTRYPOINT ["/testapp"]\nLABEL dozen-bench=1\n' >"$WORK/image/Dockerfile"
IMAGE=dozen-bench/app:1
docker build -q -t "$IMAGE" "$WORK/image" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); PROXY=$(free_port); INTERNAL=$(free_port)
export DOZEN_DATA_DIR="$WORK/data" DOZEN_SERVER="http://127.0.0.1:$PORT"
export DOCKER_CONFIG="$WORK/docker-config"
SERVER_PID=""
LEFT_SWARM=""

cleanup() {
  set +e
  docker service ls -q --filter label=dozen-bench=1 | xargs -r docker service rm >/dev/null 2>&1
  docker ps -aq --filter label=dozen-bench-run=1 | xargs -r docker rm -f >/dev/null 2>&1
  if [ -n "$SERVER_PID" ]; then
    for stack in $("$BIN" stacks -o json 2>/dev/null | python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)]' 2>/dev/null); do
      "$BIN" down "$stack" >/dev/null 2>&1
    done
    kill "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
  HOME_ID=$(cat "$WORK/data/agent/home-id" 2>/dev/null)
  [ -n "$HOME_ID" ] && docker ps -aq --filter "label=dozen.home=$HOME_ID" | xargs -r docker rm -f >/dev/null 2>&1
  [ -n "$LEFT_SWARM" ] && docker swarm leave --force >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" server --listen "127.0.0.1:$PORT" --proxy-listen "127.0.0.1:$PROXY" \
  --proxy-internal-listen "127.0.0.1:$INTERNAL" --port-range 43000-43999 --log warn \
  >>"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do curl -sf "$DOZEN_SERVER/healthz" >/dev/null && break; sleep 0.1; done
cat "$WORK/data/token" | docker login "127.0.0.1:$PORT" -u dozen --password-stdin >/dev/null 2>&1
docker tag "$IMAGE" "127.0.0.1:$PORT/bench/app:1"
docker push -q "127.0.0.1:$PORT/bench/app:1" >/dev/null
docker rmi "127.0.0.1:$PORT/bench/app:1" >/dev/null

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != "active" ]; then
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  LEFT_SWARM=1
fi

# A warm-up of each (the first dozen start pulls the image through the node's mirror, the
# first Swarm service sets up its networks): not counted.
python3 - "$BIN" "$IMAGE" "$PROXY" "$WORK" "$RUNS" <<'EOF'
import asyncio, os, socket, statistics, subprocess, sys, time

BIN, IMAGE, PROXY, WORK, RUNS = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
TIMEOUT = 30.0
TICK = 0.005

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

async def attempt(port, host):
    """One poll: True on a 200 from the app."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read(4096)
        writer.close()
        return answer.startswith(b"HTTP/1.1 200") and b"hello from" in answer
    except OSError:
        return False

async def first_answer(start, port, host):
    """The shared poller: a new attempt every 5 ms (each on its own connection, so one that
    hangs delays none after it) until the first good answer; seconds since start."""
    pending = set()
    try:
        while time.monotonic() - start < TIMEOUT:
            task = asyncio.ensure_future(asyncio.wait_for(attempt(port, host), 2.0))
            pending.add(task)
            done, _ = await asyncio.wait(pending, timeout=TICK)
            for t in done:
                pending.discard(t)
                try:
                    ok = t.result()
                except (asyncio.TimeoutError, OSError):
                    ok = False
                if ok:
                    return time.monotonic() - start
        raise SystemExit(f"no answer on port {port} (host {host}) within {TIMEOUT} s")
    finally:
        for t in pending:
            t.cancel()

def poll(start, port, host):
    return asyncio.run(first_answer(start, port, host))

def run(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

def finish(proc, what):
    _, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed: {err.decode()}")

def gone(check):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if not subprocess.run(check, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.05)

def docker_run_with(network_args):
    """`docker run -d` with `network_args` (given the free port), answered on that port."""
    def start(i):
        port = free_port()
        start = time.monotonic()
        proc = run(["docker", "run", "-d", "--label", "dozen-bench-run=1"] + network_args(port)
                   + [IMAGE])
        finish(proc, "docker run")
        took = poll(start, port, "localhost")
        subprocess.run(["sh", "-c", "docker ps -aq --filter label=dozen-bench-run=1 | xargs -r docker rm -f"],
                       capture_output=True)
        return took
    return start

# The floor: a published port.
docker_run = docker_run_with(lambda port: ["-e", "PORT=8080", "-p", f"127.0.0.1:{port}:8080"])
# The floor for dozen's own way: the node's network, no port proxy (not in the ratios).
docker_run_host = docker_run_with(lambda port: ["-e", f"PORT={port}", "--network", "host"])

def swarm(i):
    port = free_port()
    name = f"dozen-bench-{os.getpid()}-{i}"
    start = time.monotonic()
    proc = run(["docker", "service", "create", "--detach", "--no-resolve-image", "--quiet",
                "--label", "dozen-bench=1", "--name", name, "-e", "PORT=8080",
                "--publish", f"mode=host,target=8080,published={port}", IMAGE])
    finish(proc, "docker service create")
    took = poll(start, port, "localhost")
    subprocess.run(["docker", "service", "rm", name], capture_output=True)
    gone(["docker", "ps", "-aq", "--filter", f"label=com.docker.swarm.service.name={name}"])
    return took

def dozen(i):
    stack = f"cs{os.getpid()}x{i}"
    path = os.path.join(WORK, f"{stack}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{stack}"\n[services.app{stack}]\nimage = "bench/app:1"\n'
                f'[[services.app{stack}.routes]]\nhost = "{stack}.bench"\npath = "/"\n')
    start = time.monotonic()
    proc = run([BIN, "apply", "-f", path, "--no-wait"])
    finish(proc, "dozen apply")
    took = poll(start, PROXY, f"{stack}.bench")
    subprocess.run([BIN, "down", stack], capture_output=True)
    home = open(os.path.join(WORK, "data", "agent", "home-id")).read().strip()
    gone(["docker", "ps", "-aq", "--filter", f"label=dozen.home={home}"])
    return took

systems = [("dozen", dozen), ("swarm", swarm), ("docker_run", docker_run),
           ("docker_run_host", docker_run_host)]
for name, f in systems:
    f(-1)
times = {name: [] for name, _ in systems}
for i in range(RUNS):
    order = systems[i % len(systems):] + systems[:i % len(systems)]
    line = []
    for name, f in order:
        t = f(i)
        times[name].append(t)
        line.append(f"{name}={t * 1000:.0f}ms")
    print(f"run {i + 1:2}/{RUNS}: " + " ".join(line), flush=True)

def p90(xs):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
print()
print(f"{'':16}{'median ms':>10}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}")
med = {}
for name, _ in systems:
    xs = times[name]; med[name] = statistics.median(xs)
    print(f"{name:16}{med[name] * 1000:10.0f}{p90(xs) * 1000:10.0f}{min(xs) * 1000:10.0f}{max(xs) * 1000:10.0f}")
x = med["swarm"] / med["dozen"]
y = med["dozen"] / med["docker_run"]
print(f"\nSwarm / dozen = {x:.2f} (goal >= 1.5); dozen / docker run = {y:.2f} (goal <= 1.3); "
      f"dozen / docker run --network host = {med['dozen'] / med['docker_run_host']:.2f}")
print(f"container_start_ratio_vs_swarm={x:.2f} container_start_ratio_vs_docker_run={y:.2f}")
EOF
