#!/usr/bin/env bash
# Debian toolchains for `codeshell eval` tests (MultiPL-E languages). Idempotent and quiet;
# about 1-3 minutes on a fresh Debian 12 image. Julia and Swift are not packaged by Debian:
# their tests are skipped (and `codeshell eval doctor` says so).
set -euo pipefail
PKGS=(util-linux nodejs default-jdk-headless libjavatuples-java g++ rustc php-cli r-base-core racket ldc
      lua5.3 lua-unit)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-eval: all toolchains present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-eval: installed ${missing[*]}"
