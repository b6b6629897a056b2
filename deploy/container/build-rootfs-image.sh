#!/usr/bin/env bash
# Builds the Lifeboat runtime image without a container registry: a root filesystem made of
# Debian packages (mmdebstrap, the apt sources of this host), the release binaries already built
# (`cargo build --release`), imported with podman (or buildah). Then, inside the image, runs
# `lifeboat --version` and starts a one-node coordinator (generated certificates and config),
# which must answer `lifeboat status` from the host as its regional leader.
#
#   deploy/container/build-rootfs-image.sh [--bin-dir DIR] [--tag TAG] [--keep]
#
# Same runtime as the `runtime` stage of deploy/container/Containerfile: Debian "essential"
# packages + ca-certificates, user lifeboat (10001), binaries in /usr/local/bin.
#
# Runs each step with podman first; where podman cannot run containers (this sandbox: crun
# refuses cgroups in hybrid mode), with `buildah run --isolation chroot`, and says which.
# Exit status: 0 built and checked; 1 a step failed; 2 could not run here (a missing tool,
# binaries not built, not root), with the reason on stderr.
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
TAG=localhost/lifeboat:0.1.0
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) echo "usage: $0 [--bin-dir DIR] [--tag TAG] [--keep]" >&2; exit 1 ;;
    esac
done

say() { echo "build-rootfs-image: $*"; }
cannot() { echo "build-rootfs-image: CANNOT RUN HERE: $*" >&2; exit 2; }
fail() { echo "build-rootfs-image: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || cannot "needs root (mmdebstrap root mode, podman/buildah storage)"
command -v mmdebstrap >/dev/null || cannot "mmdebstrap not installed (apt-get install mmdebstrap)"
command -v podman >/dev/null || command -v buildah >/dev/null \
    || cannot "neither podman nor buildah installed"
for b in lifeboat lifeboat-coordinator lifeboat-agent; do
    [ -x "$BIN_DIR/$b" ] || cannot "$BIN_DIR/$b missing: run cargo build --release --workspace --bins"
done

WORK=$(mktemp -d /tmp/lifeboat-image.XXXXXX)
# The release profile keeps line tables (debug = "line-tables-only"); the image keeps the
# symbols (function names in backtraces) but not the DWARF.
mkdir -p "$WORK/bin"
BINS=()
for b in lifeboat lifeboat-coordinator lifeboat-agent; do
    if command -v strip >/dev/null; then
        strip --strip-debug -o "$WORK/bin/$b" "$BIN_DIR/$b"
    else
        cp "$BIN_DIR/$b" "$WORK/bin/$b"
    fi
    BINS+=("$WORK/bin/$b")
done
CTR=""
COORD_PID=""
cleanup() {
    if [ -n "$COORD_PID" ]; then kill "$COORD_PID" 2>/dev/null || true; fi
    if [ -n "$CTR" ]; then buildah rm "$CTR" >/dev/null 2>&1 || true; fi
    if [ "$KEEP" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# A TERM (check-deploy.sh's timeout) or ^C still runs the cleanup.
trap 'exit 143' TERM INT

# --- 1. root filesystem from this host's apt sources -------------------------------------
SOURCES=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qv '^\s*\(#\|$\)' "$f" && SOURCES+=("$f")
done
[ "${#SOURCES[@]}" -gt 0 ] || cannot "no apt sources on this host for mmdebstrap"
# shellcheck disable=SC1091
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
say "mmdebstrap $SUITE (variant essential + ca-certificates) from ${SOURCES[*]}"
t0=$(date +%s)
# The hooks' "$1" is the root directory, expanded by mmdebstrap.
# shellcheck disable=SC2016
mmdebstrap --quiet --mode=root --variant=essential --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='echo "lifeboat:x:10001:10001:Lifeboat:/var/lib/lifeboat:/usr/sbin/nologin" >> "$1/etc/passwd"' \
    --customize-hook='echo "lifeboat:x:10001:" >> "$1/etc/group"' \
    --customize-hook='mkdir -p "$1/var/lib/lifeboat/coordinator" "$1/etc/lifeboat" && chown -R 10001:10001 "$1/var/lib/lifeboat" && chmod 0700 "$1/var/lib/lifeboat/coordinator"' \
    --customize-hook="copy-in ${BINS[*]} /usr/local/bin" \
    --customize-hook='rm -rf "$1/var/cache/apt" "$1/var/lib/apt/lists"' \
    "$SUITE" "$WORK/rootfs.tar" "${SOURCES[@]}" \
    || fail "mmdebstrap"
say "rootfs: $(du -h "$WORK/rootfs.tar" | cut -f1) in $(($(date +%s) - t0)) s"

# --- 2. image ----------------------------------------------------------------------------
CHANGES=(--change 'USER 10001:10001' --change 'WORKDIR /var/lib/lifeboat'
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' --change 'EXPOSE 7101' --change 'EXPOSE 7102'
    --change 'CMD ["/usr/local/bin/lifeboat-coordinator", "--config", "/etc/lifeboat/coordinator.toml"]')
# The previous image of this tag, so that rebuilds leave no dangling images (not forced: kept
# while a container uses it).
if command -v podman >/dev/null; then
    podman rmi "$TAG" >/dev/null 2>&1 || true
    podman import --quiet "${CHANGES[@]}" "$WORK/rootfs.tar" "$TAG" >/dev/null || fail "podman import"
else
    buildah rmi "$TAG" >/dev/null 2>&1 || true
    CTR=$(buildah from scratch)
    buildah add --quiet "$CTR" "$WORK/rootfs.tar" / >/dev/null
    buildah config --user 10001:10001 --workingdir /var/lib/lifeboat \
        --env PATH=/usr/local/bin:/usr/bin:/bin --port 7101 --port 7102 \
        --cmd '["/usr/local/bin/lifeboat-coordinator", "--config", "/etc/lifeboat/coordinator.toml"]' "$CTR"
    buildah commit --quiet "$CTR" "$TAG" >/dev/null || fail "buildah commit"
    buildah rm "$CTR" >/dev/null
    CTR=""
fi
say "image $TAG built"

# --- 3. run inside the image -------------------------------------------------------------
# podman run when this machine can run containers; else buildah's chroot isolation (no OCI
# runtime, no cgroups; the host's network). Ulimits at the host's own values: raising them
# needs CAP_SYS_RESOURCE, which a sandbox may lack.
RUNNER=""
PODMAN_ERR=""
ULIMITS=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
if command -v podman >/dev/null; then
    if out=$(podman run --rm --network host "${ULIMITS[@]}" "$TAG" lifeboat --version 2>&1); then
        RUNNER=podman
    else
        PODMAN_ERR=$(echo "$out" | tail -n 1)
        say "podman cannot run containers here: $PODMAN_ERR"
    fi
fi
if [ -z "$RUNNER" ]; then
    command -v buildah >/dev/null || cannot "podman cannot run containers ($PODMAN_ERR) and buildah is not installed"
    CTR=$(buildah from --quiet "$TAG")
    out=$(buildah run --isolation chroot --user 10001:10001 "$CTR" -- lifeboat --version 2>&1) \
        || fail "lifeboat --version in the image (buildah run --isolation chroot): $out"
    RUNNER="buildah run --isolation chroot"
fi
say "inside the image ($RUNNER): $out"
echo "$out" | grep -Eq '^lifeboat(-cli)? [0-9]' || fail "unexpected lifeboat --version output: $out"

# A one-node coordinator with generated certificates, on free loopback ports.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HPORT=$(free_port)
mkdir -p "$WORK/etc/tls"
"$BIN_DIR/lifeboat" certs init --dir "$WORK/etc/tls" --region local --coordinator coord1 --admin admin >/dev/null
cat > "$WORK/etc/coordinator.toml" <<EOF
node_id = 1
region = "local"
listen = "127.0.0.1:$PORT"
data_dir = "/var/lib/lifeboat/coordinator"
health_addr = "127.0.0.1:$HPORT"
[[members]]
id = 1
addr = "127.0.0.1:$PORT"
[tls]
ca = "/etc/lifeboat/tls/ca.pem"
cert = "/etc/lifeboat/tls/coord1.pem"
key = "/etc/lifeboat/tls/coord1.key"
EOF
chmod -R a+rX "$WORK/etc"
CMD=(timeout -s TERM 20 lifeboat-coordinator --config /etc/lifeboat/coordinator.toml)
if [ "$RUNNER" = podman ]; then
    podman run --rm --network host "${ULIMITS[@]}" -v "$WORK/etc:/etc/lifeboat:ro" \
        --tmpfs /var/lib/lifeboat/coordinator:uid=10001,gid=10001,mode=0700 \
        "$TAG" "${CMD[@]}" >"$WORK/coordinator.log" 2>&1 &
else
    buildah run --isolation chroot --user 10001:10001 -v "$WORK/etc:/etc/lifeboat:ro" \
        "$CTR" -- "${CMD[@]}" >"$WORK/coordinator.log" 2>&1 &
fi
COORD_PID=$!
say "coordinator started in the image (127.0.0.1:$PORT, health 127.0.0.1:$HPORT)"
ok=0
for _ in $(seq 1 60); do
    if st=$("$BIN_DIR/lifeboat" status --tls-dir "$WORK/etc/tls" -c "127.0.0.1:$PORT" 2>&1) \
        && echo "$st" | grep -q 'Leader'; then
        ok=1
        break
    fi
    kill -0 "$COORD_PID" 2>/dev/null || break
    sleep 0.25
done
if [ "$ok" != 1 ]; then
    echo "--- coordinator log" >&2
    cat "$WORK/coordinator.log" >&2
    fail "the coordinator in the image did not become its region's leader: ${st:-no answer}"
fi
say "coordinator in the image answers status as leader:"
echo "$st" | head -n 5 | sed 's/^/    /'
wait "$COORD_PID" || rc=$?
COORD_PID=""
# timeout(1) exits 124 after its SIGTERM: the coordinator shut down on SIGTERM.
[ "${rc:-0}" = 124 ] || [ "${rc:-0}" = 0 ] || fail "coordinator exit status ${rc:-0} (log: $WORK/coordinator.log)"
grep -q 'shutting down' "$WORK/coordinator.log" || fail "no graceful shutdown in $WORK/coordinator.log"
say "coordinator stopped on SIGTERM"
say "OK: $TAG ($RUNNER)"
