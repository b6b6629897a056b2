#!/usr/bin/env bash
# Builds every Lifeboat binary (release) and runs `lifeboat demo` with the given arguments:
# a local 3-coordinator cluster on loopback that replicates a real directory, SIGKILLs the Raft
# leader mid-stream, restores, and proves every byte came back. Exits non-zero if anything differs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec ./target/release/lifeboat demo "$@"
