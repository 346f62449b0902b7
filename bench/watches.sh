#!/usr/bin/env bash
# Write latency of the embedded store with 5,000 open watches (crates/store/examples/watch-bench.rs):
# 4,000 on a prefix of their own (a write wakes one), 900 following the prefix every write goes
# to (each write wakes all 900), 100 that never read (stalled clients: cut off once their
# 1,024-message buffer is full). 2,000 puts of 1 KiB, one at a time, each timed to its
# acknowledgement (fsync included).
#
# With OLD_REV=<commit> the same program is built against that commit's store (in a git
# worktree under /tmp) and run alternately with this one, so the two compare in the same run.
#
# Last line: write_p50_ms=.. write_p99_ms=.. write_max_ms=.. peak_rss_mib=..   goal: p99 < 10 ms
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WATCHES=${WATCHES:-5000}
WRITES=${WRITES:-2000}
RUNS=${RUNS:-2}
cargo build --release --quiet -p dozen-store --example watch-bench
NEW="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/watch-bench"

OLD=""
if [ -n "${OLD_REV:-}" ]; then
  TREE=/tmp/dozen-watch-bench-old
  rm -rf "$TREE"
  git worktree prune
  git worktree add -f -q "$TREE" "$OLD_REV"
  trap 'git -C "$ROOT" worktree remove --force "$TREE" 2>/dev/null || true' EXIT
  mkdir -p "$TREE/crates/store/examples"
  cp crates/store/examples/watch-bench.rs "$TREE/crates/store/examples/"
  grep -q 'name = "watch-bench"' "$TREE/crates/store/Cargo.toml" ||
    printf '\n[[example]]\nname = "watch-bench"\npath = "examples/watch-bench.rs"\n' >>"$TREE/crates/store/Cargo.toml"
  (cd "$TREE" && CARGO_TARGET_DIR=/tmp/dozen-watch-bench-old-target \
    cargo build --release --quiet -p dozen-store --example watch-bench)
  OLD=/tmp/dozen-watch-bench-old-target/release/examples/watch-bench
fi

last=""
for run in $(seq "$RUNS"); do
  if [ -n "$OLD" ]; then
    echo "run $run, $OLD_REV:"
    timeout 300 "$OLD" --watches "$WATCHES" --writes "$WRITES" | sed -n 2p
  fi
  echo "run $run, this tree:"
  out=$(timeout 300 "$NEW" --watches "$WATCHES" --writes "$WRITES")
  echo "$out" | sed -n 1,2p
  last=$(echo "$out" | tail -1)
done
echo "$last"
