#!/usr/bin/env bash
# Checks the deployment files in deploy/ (run as root on Debian; called by scripts/test.sh after
# the release build). Installs what it needs, idempotently:
#   apt: systemd (systemd-analyze), yamllint, mmdebstrap, podman, buildah
#   pip: kubernetes-validate (plain pip, else --break-system-packages, else a venv)
# Checks, each reported PASS / FAIL / SKIPPED (with the reason):
#   1. systemd-analyze verify of deploy/systemd/*.service: no output on stderr
#   2. systemd-analyze security --offline=true: coordinator <= 4.0, agent <= 4.0
#   3. yamllint --strict of deploy/kubernetes
#   4. kubernetes-validate --strict -k 1.30.0 of deploy/kubernetes/*.yaml
#   5. the runtime image from Debian packages (deploy/container/build-rootfs-image.sh): built,
#      `lifeboat --version` and a coordinator start inside it. SKIPPED (not failed) when this
#      machine cannot build or run it (exit status 2 of the script, reason printed), or with
#      LIFEBOAT_SKIP_IMAGE=1.
# Exit status 1 when any check fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:$HOME/.local/bin"

log() { echo "check-deploy: $*"; }
RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS     $1"); log "PASS $1"; }
fail() { RESULTS+=("FAIL     $1: $2"); log "FAIL $1: $2" >&2; FAILED=1; }
skip() { RESULTS+=("SKIPPED  $1: $2"); log "SKIPPED $1: $2"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && SUDO="sudo -E"
fi

# --- tools ---------------------------------------------------------------------------------
APT=(systemd yamllint)
[ "${LIFEBOAT_SKIP_IMAGE:-0}" = 1 ] || APT+=(mmdebstrap podman buildah)
missing=()
for p in "${APT[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        log "apt-get install ${missing[*]} failed; the checks needing them will fail"
    fi
fi

# kubernetes-validate from PyPI.
KV=$(command -v kubernetes-validate || true)
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/lifeboat-deploy-venv"
[ -z "$KV" ] && [ -x "$VENV/bin/kubernetes-validate" ] && KV="$VENV/bin/kubernetes-validate"
if [ -z "$KV" ]; then
    log "installing kubernetes-validate (PyPI)"
    PIP=(python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
    if "${PIP[@]}" kubernetes-validate 2>/dev/null || "${PIP[@]}" --break-system-packages kubernetes-validate; then
        hash -r
        KV=$(command -v kubernetes-validate || true)
        if [ -z "$KV" ]; then
            d=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
            [ -x "$d/kubernetes-validate" ] && KV="$d/kubernetes-validate"
        fi
    fi
    if [ -z "$KV" ]; then
        log "pip install did not give kubernetes-validate; trying a venv in $VENV"
        { python3 -m venv "$VENV" || { $SUDO apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"; }; } \
            && "$VENV/bin/pip" install --quiet kubernetes-validate && KV="$VENV/bin/kubernetes-validate"
    fi
fi

# --- 1, 2: systemd -------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    # verify checks that ExecStart is executable: point it at the built binaries (or stubs).
    units=$(mktemp -d)
    bindir="${CARGO_TARGET_DIR:-$REPO/target}/release"
    if ! [ -x "$bindir/lifeboat-coordinator" ] || ! [ -x "$bindir/lifeboat-agent" ]; then
        bindir="$units/bin"
        mkdir -p "$bindir"
        for b in lifeboat-coordinator lifeboat-agent; do printf '#!/bin/sh\n' >"$bindir/$b"; chmod +x "$bindir/$b"; done
        log "release binaries not built: systemd-analyze verify runs against stub executables"
    fi
    for u in deploy/systemd/*.service; do
        sed "s#/usr/local/bin/#$bindir/#g" "$u" >"$units/$(basename "$u")"
    done
    err=$(systemd-analyze verify --man=no "$units"/*.service 2>&1 >/dev/null)
    rc=$?
    if [ $rc -eq 0 ] && [ -z "$err" ]; then
        pass "systemd-analyze verify deploy/systemd/*.service"
    else
        fail "systemd-analyze verify" "rc $rc: $err"
    fi
    rm -rf "$units"
    for unit in lifeboat-coordinator lifeboat-agent; do
        line=$(systemd-analyze security --offline=true "deploy/systemd/$unit.service" 2>&1 | grep 'Overall exposure level')
        score=$(echo "$line" | sed -n 's/.*: \([0-9.]*\) .*/\1/p')
        if [ -z "$score" ]; then
            fail "systemd-analyze security $unit" "no score in: $line"
        elif python3 -c "import sys; sys.exit(0 if float('$score') <= 4.0 else 1)"; then
            pass "systemd-analyze security $unit: $score (<= 4.0)"
        else
            fail "systemd-analyze security $unit" "$score > 4.0"
        fi
    done
else
    fail "systemd" "systemd-analyze not installed"
fi

# --- 3, 4: Kubernetes ----------------------------------------------------------------------
if command -v yamllint >/dev/null; then
    if out=$(yamllint --strict -c deploy/kubernetes/.yamllint deploy/kubernetes 2>&1); then
        pass "yamllint --strict deploy/kubernetes"
    else
        fail "yamllint" "$out"
    fi
else
    fail "yamllint" "not installed"
fi
if [ -n "$KV" ]; then
    if out=$("$KV" --strict -k 1.30.0 deploy/kubernetes/*.yaml 2>&1); then
        pass "kubernetes-validate --strict -k 1.30.0 ($(echo "$out" | grep -c passed) resources)"
    else
        fail "kubernetes-validate" "$out"
    fi
else
    fail "kubernetes-validate" "could not be installed from PyPI"
fi

# --- 5: the runtime image ------------------------------------------------------------------
if [ "${LIFEBOAT_SKIP_IMAGE:-0}" = 1 ]; then
    skip "runtime image" "LIFEBOAT_SKIP_IMAGE=1"
else
    t0=$(date +%s)
    out=$(timeout 300 bash deploy/container/build-rootfs-image.sh 2>&1)
    rc=$?
    while IFS= read -r l; do echo "    $l"; done <<<"$out"
    case $rc in
        0) pass "runtime image built from Debian packages and run ($(echo "$out" | tail -n 1 | sed 's/.*(//; s/)$//'), $(($(date +%s) - t0)) s)" ;;
        2) skip "runtime image" "$(echo "$out" | grep 'CANNOT RUN HERE' | sed 's/.*CANNOT RUN HERE: //')" ;;
        124) fail "runtime image" "timed out after 300 s" ;;
        *) fail "runtime image" "$(echo "$out" | grep FAILED | tail -n 1)" ;;
    esac
fi

echo
log "summary"
for r in "${RESULTS[@]}"; do echo "  $r"; done
exit $FAILED
