#!/usr/bin/env bash
# Prints the two Secrets of a region's manifests (pipe into `kubectl apply -f -`):
#   lifeboat-coordinator-<REGION>-tls  ca.pem + lifeboat-coordinator-<REGION>-{0,1,2}.pem/.key
#   lifeboat-agent-<REGION>-tls        ca.pem + <node name>.pem/.key for every node
# The certificates come from `lifeboat certs init` in CERT_DIR (default ./lifeboat-certs; its CA
# is created once and reused, so run it again with the same CERT_DIR for the next region).
#
#   make-secrets.sh REGION NODE1,NODE2,... [CERT_DIR]
#
# Needs `lifeboat` (PATH, or LIFEBOAT=path) and `kubectl` (only for its offline --dry-run=client).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 REGION NODE1,NODE2,... [CERT_DIR]" >&2
    exit 1
fi
region=$1
nodes=$2
dir=${3:-./lifeboat-certs}
lifeboat=${LIFEBOAT:-lifeboat}
ns=lifeboat
coords="lifeboat-coordinator-$region-0,lifeboat-coordinator-$region-1,lifeboat-coordinator-$region-2"

"$lifeboat" certs init --dir "$dir" --region "$region" --coordinator "$coords" --agent "$nodes" >&2

secret() {
    local name=$1
    shift
    local args=(--from-file="ca.pem=$dir/ca.pem")
    for n in "$@"; do
        args+=(--from-file="$n.pem=$dir/$n.pem" --from-file="$n.key=$dir/$n.key")
    done
    echo "---"
    kubectl create secret generic "$name" --namespace "$ns" "${args[@]}" --dry-run=client -o yaml
}

IFS=, read -r -a coord_names <<<"$coords"
IFS=, read -r -a node_names <<<"$nodes"
secret "lifeboat-coordinator-$region-tls" "${coord_names[@]}"
secret "lifeboat-agent-$region-tls" "${node_names[@]}"
