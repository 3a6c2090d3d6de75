#!/usr/bin/env bash
# Set up mlxchat on a fresh machine, then run a command in its virtual environment.
#
#   ./setup.sh python flows/speedrun.py --preset smoke      # install, then the smoke speedrun
#   ./setup.sh --test python -m pytest -q                   # install the test tools too, then the tests
#
# Linux with apt (Debian/Ubuntu): installs the OS packages first (OpenBLAS, python3-venv; with
# --test Chromium and its driver for the browser test), through sudo when not root, and only
# those missing. macOS and other Linux: no OS packages (MLX uses Metal and Accelerate on a Mac).
# Then `.venv` (Python 3.11 or newer) with mlxchat installed editable; pip runs again only
# when pyproject.toml or the extras changed. The command runs with `.venv/bin` first on PATH
# and, on Linux, OpenBLAS preloaded (the test suite cannot re-execute itself as mlxchat does).
set -euo pipefail
cd "$(dirname "$0")"

test_tools=0
if [ "${1:-}" = "--test" ]; then test_tools=1; shift; fi

# apt_install [--optional] PACKAGE...: those not installed yet (apt-get update once if needed).
apt_install() {
  local optional=0 p missing=() sudo=()
  if [ "$1" = --optional ]; then optional=1; shift; fi
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "setup: apt-get install ${missing[*]}" >&2
  if ! { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null \
         || { "${sudo[@]}" apt-get update -q >/dev/null \
              && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null; }; }; then
    [ "$optional" = 1 ] || { echo "setup: could not install ${missing[*]}" >&2; exit 1; }
    echo "setup: could not install ${missing[*]}; the tests that need them will say so" >&2
  fi
}

if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  apt_install libopenblas0-pthread python3-venv
  [ "$test_tools" = 0 ] || apt_install --optional chromium chromium-driver
fi

if [ ! -x .venv/bin/python ]; then
  python=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python="$candidate"; break
    fi
  done
  if [ -z "$python" ]; then
    echo "setup: mlxchat needs Python 3.11 or newer (macOS: brew install python@3.12)" >&2
    exit 2
  fi
  "$python" -m venv .venv
fi

extras=""
[ "$(uname -s)" = Linux ] && extras="cpu"
[ "$test_tools" = 1 ] && extras="${extras:+$extras,}test"
# What was installed: pyproject.toml's checksum, then the extras. A run without --test after
# one with it needs nothing new.
stamp=.venv/.mlxchat-installed
checksum="$(cksum < pyproject.toml)"
if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$checksum" ] \
    && { [ "$(tail -n 1 "$stamp")" = "$extras" ] || [ "$(tail -n 1 "$stamp")" = "${extras:+$extras,}test" ]; }; then
  :
else
  echo "setup: pip install -e .${extras:+[$extras]}" >&2
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  printf '%s\n%s\n' "$checksum" "$extras" > "$stamp"
fi

[ "$#" -gt 0 ] || exit 0
export PATH="$PWD/.venv/bin:$PATH"
preload="$(.venv/bin/python -m mlxchat.blas)"
if [ -n "$preload" ]; then export LD_PRELOAD="$preload${LD_PRELOAD:+ $LD_PRELOAD}"; fi
exec "$@"
