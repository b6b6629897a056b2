#!/usr/bin/env bash
# Builds every Lifeboat binary (release) and runs `lifeboat demo` with the given arguments: two
# local regions of 3 coordinators each and a witness on loopback; region a replicates a real
# directory, region b keeps a warm replica; every process of region a is SIGKILLed; prints the
# measured RTO and RPO, restarts region a as a standby. Exits non-zero if anything acknowledged
# is missing in region b. `--single-region` runs the in-region leader-kill demo instead.
# `--with-databases` adds a Redis and a PostgreSQL per region (when installed): written to during
# the drill, killed with region a; b's must be primaries holding every acknowledged write.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec ./target/release/lifeboat demo "$@"
