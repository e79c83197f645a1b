#!/usr/bin/env bash
# Debian packages for the serve tests: chromium for the headless-browser test of the web UI
# (driven by the Python `playwright` package with executable_path=/usr/bin/chromium; no
# browser download). Idempotent and quiet. Required by CI (.ci/setup-toolchains.sh; its tests
# run with CODESHELL_REQUIRE_TOOLS=chromium).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null 2>&1 || { echo "install-serve: chromium is still missing" >&2; exit 1; }
