#!/usr/bin/env bash
# The demo shop in containers: builds the demo's services as one static binary, then `dozen up`
# builds the image (FROM scratch) through the local Docker Engine, pushes it to dozen's own
# registry and runs the stack from it. Extra arguments go to `dozen up` (e.g. -d).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
TRIPLE="$(uname -m)-unknown-linux-gnu"
echo "building the static demo binary (the first time takes a few minutes)..."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet --target "$TRIPLE" -p dozen --bin dozen-demo
cp "${CARGO_TARGET_DIR:-target}/$TRIPLE/release/dozen-demo" examples/demo-containers/dozen-demo
cargo build --release --quiet --bin dozen
exec "${CARGO_TARGET_DIR:-target}/release/dozen" up -f examples/demo-containers/dozen.toml "$@"
