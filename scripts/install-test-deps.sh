#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, from Debian's packages (run as root):
#   chromium  the browser test plays a stream in it (without it that test is skipped, loudly,
#             except under CI=true, where it fails);
#   nasm      OpenH264's assembly: software encoding about 1.7x faster (the build falls back
#             to C without it).
set -euo pipefail

if command -v chromium >/dev/null && command -v nasm >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or: sudo $0)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium nasm
