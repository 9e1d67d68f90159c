#!/usr/bin/env bash
# Fetch Debian's own kernel package for the TCG Linux guest (VM testbed) and
# unpack it into build/guest/kernel/ (nothing is installed on the host).
# Idempotent: does nothing when the unpacked kernel is already there.
#   scripts/fetch-guest-kernel.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-build/guest/kernel}
log() { printf '[guest-kernel] %s\n' "$*"; }

if compgen -G "$dest/boot/vmlinuz-*" >/dev/null; then
  log "present: $(basename "$(ls "$dest"/boot/vmlinuz-* | head -1)")"
  exit 0
fi
# linux-image-amd64 is a meta package: resolve the real image package.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [[ -z $pkg ]]; then
  log "cannot resolve linux-image-amd64 (run apt-get update?)" >&2
  exit 1
fi
debs="$(dirname "$dest")/debs"   # next to DEST, not always build/guest
mkdir -p "$dest" "$debs"
log "downloading $pkg (about 70 MB)"
(cd "$debs" && apt-get download -q "$pkg")
deb=$(ls "$debs"/"$pkg"_*.deb | head -1)
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$dest"
rm -f "$deb"
log "ready: $(ls "$dest"/boot/vmlinuz-*)"
