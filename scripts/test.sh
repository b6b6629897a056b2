#!/usr/bin/env bash
# Runs the whole Lifeboat test suite on a fresh Debian machine: installs what tests need
# (S3 server, redis, nftables, iproute2), then builds and runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
export PATH="$PATH:$HOME/.local/bin"
cargo build --release --workspace --bins
# Deployment files (systemd units, Kubernetes manifests, the runtime image): reported here, and
# failing the run at the end, after the tests.
deploy_rc=0
bash scripts/check-deploy.sh || deploy_rc=$?
cargo test --release --workspace --no-fail-fast -- --test-threads=2
exit $deploy_rc
