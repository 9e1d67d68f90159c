#!/usr/bin/env bash
# Fetch the guest kernel of the VM testbed and the headers to build modules
# for it, both pinned in scripts/guest-kernel.env:
#   - Debian's linux-image-<abi>-amd64 unpacked into DEST (build/guest/kernel;
#     nothing installed on the host);
#   - linux-headers-<abi>-amd64, -common and linux-kbuild-6.1 of exactly that
#     version installed with apt-get (/usr/src/linux-headers-<abi>-amd64), for
#     guest-policy/kernel/ (vkick_virtio_blk.ko).
# When the archive no longer carries the pinned version (Debian's security
# archive keeps only the newest), it takes the archive's current
# linux-image-amd64 and the headers of that same version, and says to bump
# the pin. Idempotent.
#   scripts/fetch-guest-kernel.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-build/guest/kernel}
log() { printf '[guest-kernel] %s\n' "$*"; }
# shellcheck source=guest-kernel.env
source scripts/guest-kernel.env
abi=$GUEST_KERNEL_ABI
version=$GUEST_KERNEL_VERSION

available() {  # PACKAGE VERSION: the archive can serve exactly that version
  apt-cache madison "$1" 2>/dev/null | awk -v v="$2" '$3 == v {found=1} END {exit !found}'
}

if ! available "linux-image-$abi-amd64" "$version" || ! available "linux-headers-$abi-amd64" "$version"; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [[ -z $pkg ]]; then
    log "pinned linux-image-$abi-amd64 $version is not in the archive and linux-image-amd64 cannot be resolved (apt-get update?)" >&2
    exit 1
  fi
  abi=${pkg#linux-image-}; abi=${abi%-amd64}
  version=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
  log "WARNING: the archive no longer has the pinned $GUEST_KERNEL_ABI ($GUEST_KERNEL_VERSION);"
  log "WARNING: using $abi ($version) for both kernel and headers; bump scripts/guest-kernel.env"
fi

# Headers and kbuild of exactly the kernel's version.
hdr_pkgs=("linux-headers-$abi-amd64=$version" "linux-headers-$abi-common=$version" "linux-kbuild-${version%%.*}.$(cut -d. -f2 <<<"$version")=$version")
if [[ $(dpkg-query -W -f='${Version}' "linux-headers-$abi-amd64" 2>/dev/null) != "$version" ]]; then
  log "installing ${hdr_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${hdr_pkgs[@]}"
fi
log "headers: /usr/src/linux-headers-$abi-amd64 ($version)"

if [[ -e $dest/boot/vmlinuz-$abi-amd64 ]]; then
  log "present: vmlinuz-$abi-amd64"
  exit 0
fi
if compgen -G "$dest/boot/vmlinuz-*" >/dev/null; then
  log "replacing $(basename "$(ls "$dest"/boot/vmlinuz-* | head -1)") (not the pinned $abi)"
  rm -rf "$dest"
fi
debs="$(dirname "$dest")/debs"   # next to DEST, not always build/guest
mkdir -p "$dest" "$debs"
log "downloading linux-image-$abi-amd64 $version (about 70 MB)"
(cd "$debs" && apt-get download -q "linux-image-$abi-amd64=$version")
deb=$(ls "$debs"/"linux-image-$abi-amd64"_*.deb | head -1)
log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$dest"
rm -f "$deb"
log "ready: $(ls "$dest"/boot/vmlinuz-*)"
