#!/usr/bin/env bash
# System packages for `codeshell eval` and its tests. Idempotent and quiet; about 1-3 minutes on
# a fresh Debian 12 image.
#
# REQUIRED (this script exits non-zero without them, and so must CI): bubblewrap, the sandbox
# that every model-written program runs in (`eval run` / `eval score` refuse without it), and
# util-linux (prlimit, setpriv). After installing, bwrap is checked to really isolate a program
# here (fresh /proc, no capabilities, host folders absent).
#
# Best effort (a failure is reported; those languages' tests skip): the MultiPL-E toolchains.
# Julia and Swift are not packaged by Debian: their tests are skipped (`codeshell eval doctor`
# says so).
set -euo pipefail
REQUIRED=(util-linux bubblewrap)
OPTIONAL=(nodejs default-jdk-headless libjavatuples-java g++ rustc php-cli r-base-core racket ldc lua5.3 lua-unit)
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

missing() {
  local out=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
  done
  echo "${out[@]:-}"
}

updated=0
apt_install() {
  if [ "$updated" = 0 ]; then $SUDO apt-get update -qq; updated=1; fi
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=$(missing "${REQUIRED[@]}")
if [ -n "$need" ]; then
  # shellcheck disable=SC2086
  apt_install $need || { echo "install-eval: ERROR: could not install $need (required: the eval sandbox)" >&2; exit 1; }
  echo "install-eval: installed $need"
fi

# The sandbox must work here, not only be installed: the same kind of check `codeshell eval
# doctor` makes (a fresh /proc of a new PID namespace, no capabilities, no /root or /home).
drop=()
if [ "$(id -u)" = 0 ]; then drop=(/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups --bounding-set=-all); fi
probe=$(cd / && bwrap --unshare-pid --unshare-net --die-with-parent --ro-bind /usr /usr --symlink usr/bin /bin \
          --symlink usr/lib /lib --symlink usr/lib64 /lib64 --proc /proc --dev /dev "${drop[@]}" \
          /bin/sh -c 'grep "^CapEff" /proc/self/status; ls /proc | grep -c "^[0-9]"; if test -e /root -o -e /home; then echo HOST; fi' 2>&1) \
  || { echo "install-eval: ERROR: bubblewrap is installed but cannot run a sandbox here: $probe" >&2; exit 1; }
if ! grep -q "CapEff:.*0000000000000000" <<<"$probe" || grep -q HOST <<<"$probe"; then
  echo "install-eval: ERROR: bubblewrap does not isolate programs here: $probe" >&2
  exit 1
fi
echo "install-eval: bubblewrap sandbox works"

need=$(missing "${OPTIONAL[@]}")
if [ -z "$need" ]; then
  echo "install-eval: all toolchains present"
  exit 0
fi
# shellcheck disable=SC2086
if apt_install $need; then
  echo "install-eval: installed $need"
else
  echo "install-eval: warning: could not install some of: $need (their MultiPL-E tests skip)" >&2
fi
