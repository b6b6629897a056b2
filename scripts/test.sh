#!/usr/bin/env bash
# Runs the whole Lifeboat test suite on a fresh Debian machine: installs what tests need
# (S3 server, redis, nftables, iproute2), then builds and runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
export PATH="$PATH:$HOME/.local/bin"
cargo build --release --workspace --bins
cargo test --release --workspace --no-fail-fast -- --test-threads=2
