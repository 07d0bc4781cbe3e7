#!/usr/bin/env bash
# Debian packages graphopt's tests use beyond the Python packages:
#   * chromium, to render the HTML report headless in tests/test_report.py;
#   * whatever scripts/install-tvm-deps.sh installs (AArch64 cross compiler, qemu-user, TVM), when
#     that script is present.
# Idempotent; never fails the CI run: what cannot be installed (no root, no apt, no network) is reported
# and the tests that need it skip with a reason.
set -u
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[install-system-deps] $*" >&2; }

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    SUDO="none"
  fi
fi

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  log "chromium already installed"
elif [ "$SUDO" = "none" ]; then
  log "not root and no passwordless sudo: chromium not installed (report render tests will skip)"
elif ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get: chromium not installed (report render tests will skip)"
else
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get install chromium"
  $SUDO apt-get update -qq >/dev/null 2>&1 || log "WARNING: apt-get update failed"
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || log "WARNING: apt-get install chromium failed; report render tests will skip"
fi

if [ -f "$ROOT_DIR/scripts/install-tvm-deps.sh" ]; then
  bash "$ROOT_DIR/scripts/install-tvm-deps.sh" || log "WARNING: install-tvm-deps.sh failed"
fi
exit 0
