#!/usr/bin/env bash
# Renders every Kustomize overlay of deploy/kubernetes and fails if one does not build:
# overlays/dev, overlays/prod, and overlays/prod with the optional monitoring component.
# Needs no cluster. Uses `kubectl kustomize` (kubectl 1.27 or later: Kustomize v5), or a
# standalone `kustomize` when no kubectl is on PATH. Exit status: 0 all rendered, 1 a
# render or a check failed, 2 no tool to render with.
#
#   deploy/kubernetes/check.sh          # summary only
#   deploy/kubernetes/check.sh -o DIR   # also writes DIR/<overlay>.yaml

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=""
if [[ "${1:-}" == "-o" ]]; then
    out="${2:?-o needs a directory}"
    mkdir -p "$out"
fi

if command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
    echo "rendering with $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
elif command -v kustomize >/dev/null 2>&1; then
    render() { kustomize build "$1"; }
    echo "rendering with kustomize $(kustomize version 2>/dev/null)"
else
    echo "check.sh: neither kubectl nor kustomize is on PATH; install kubectl 1.27 or later" >&2
    echo "(https://kubernetes.io/docs/tasks/tools/) or kustomize v5, then run this again" >&2
    exit 2
fi

# The monitoring component is commented out in overlays/prod (its CRDs may be absent). Render
# it too, from a copy of the overlay with the component switched on, so it cannot rot.
tmp="$(mktemp -d "$here/overlays/.check-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cp "$here"/overlays/prod/* "$tmp"/
sed -e 's|^# components:|components:|' \
    -e 's|^#   - ../../components/monitoring|  - ../../components/monitoring|' \
    "$here/overlays/prod/kustomization.yaml" >"$tmp/kustomization.yaml"
grep -q '^  - ../../components/monitoring' "$tmp/kustomization.yaml" || {
    echo "FAIL: could not switch the monitoring component on in a copy of overlays/prod" >&2
    exit 1
}

failed=0
check() {
    local name="$1" dir="$2" rendered
    if ! rendered="$(render "$dir" 2>&1)"; then
        echo "FAIL $name:"
        echo "$rendered" | sed 's/^/  /'
        failed=1
        return
    fi
    if [[ -n "$out" ]]; then
        printf '%s\n' "$rendered" >"$out/$name.yaml"
    fi
    # Secrets are created by hand (README.md); none may come from the repository.
    if grep -q '^kind: Secret$' <<<"$rendered"; then
        echo "FAIL $name: renders a Secret; secrets must not live in the repository"
        failed=1
        return
    fi
    local kinds
    kinds="$(grep '^kind: ' <<<"$rendered" | sed 's/^kind: //' | sort | uniq -c |
        awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')"
    echo "ok   $name: $kinds"
}

check dev "$here/overlays/dev"
check prod "$here/overlays/prod"
check prod-monitoring "$tmp"

exit "$failed"
