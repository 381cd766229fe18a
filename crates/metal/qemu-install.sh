#!/usr/bin/env bash
# Install a private qemu-system-x86_64 for `dvma metal` without touching the
# system's packages: Debian's qemu-system-x86 conflicts with the qemu-utils
# 10.0 backport the interop tests and the bench's qemu-nbd peer use, and
# `apt-get install` would downgrade it. So the .debs are fetched with
# `apt-get download` and unpacked (`dpkg -x`) into a prefix of our own,
# together with whatever shared libraries the binary finds missing.
#
# Usage: qemu-install.sh [PREFIX]   (default: $DVMA_QEMU_PREFIX, else
# ~/.cache/dvma-metal/qemu). Idempotent: a prefix whose qemu runs is kept.
# Prints the prefix on stdout; progress goes to stderr.
set -euo pipefail
prefix="${1:-${DVMA_QEMU_PREFIX:-$HOME/.cache/dvma-metal/qemu}}"
bin="$prefix/usr/bin/qemu-system-x86_64"
libdir="$prefix/usr/lib/x86_64-linux-gnu"

runs() {
    LD_LIBRARY_PATH="$libdir" "$bin" --version >/dev/null 2>&1
}

if [ -x "$bin" ] && runs; then
    echo "$prefix"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download runs as the _apt user when it can: give it a directory
# it may write.
chmod 777 "$work"
if ! apt-get download qemu-system-x86 >/dev/null 2>&1; then
    $SUDO apt-get update -qq >&2
fi
echo "dvma metal: fetching qemu-system-x86 into $prefix" >&2
apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios >&2
mkdir -p "$prefix"
for f in ./*.deb; do dpkg -x "$f" "$prefix"; done
rm -f ./*.deb

# Shared libraries the binary cannot find: fetch the packages that ship
# them (the library dependencies of qemu-system-x86 not installed here).
missing() {
    LD_LIBRARY_PATH="$libdir" ldd "$bin" | awk '/not found/ {print $1}'
}
if [ -n "$(missing)" ]; then
    deps=$(apt-cache depends qemu-system-x86 | awk '/Depends: lib/ {print $2}' | sort -u)
    need=()
    for d in $deps; do
        dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || need+=("$d")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "dvma metal: fetching libraries ${need[*]}" >&2
        apt-get download "${need[@]}" >&2
        for f in ./*.deb; do dpkg -x "$f" "$prefix"; done
    fi
fi
if [ -n "$(missing)" ]; then
    echo "dvma metal: qemu-system-x86_64 still misses: $(missing | tr '\n' ' ')" >&2
    exit 1
fi
runs || { echo "dvma metal: $bin does not run" >&2; exit 1; }
echo "$prefix"
