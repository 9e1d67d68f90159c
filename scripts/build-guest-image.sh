#!/usr/bin/env bash
# Build the VM testbed's guest initramfs from Debian packages (docs/testbed-vm.md):
#   <build>/guest/initramfs.cpio.gz  busybox-static, the guest kernel's virtio/uio
#                                    modules, vkick-blk (+ vkick-agent if built:
#                                    bin/vkick-agent-static preferred), Debian's
#                                    fio, mke2fs (mkfs.ext4), e2fsck,
#                                    vkick_virtio_blk.ko if built
#                                    (/lib/modules/vkick/),
#                                    /init = tests/vm/guest-init.sh
#   <build>/guest/vmlinuz            Debian's kernel (scripts/fetch-guest-kernel.sh)
#
#   scripts/build-guest-image.sh [--build-dir DIR] [--kernel-dir DIR] [--force]
#
# --build-dir   the CMake build dir holding bin/vkick-blk (default: build)
# --kernel-dir  an unpacked linux-image package (default: <build>/guest/kernel;
#               fetched with scripts/fetch-guest-kernel.sh when missing)
# --force       rebuild even when the image is newer than all its inputs
#
# vkick-blk is dynamically linked (Debian's Abseil is built as shared
# libraries and the tool links them): its shared libraries (ldd) and the
# dynamic loader are copied into /lib/vkick and /lib64 of the initramfs. This
# keeps the guest binary identical to the host one (no second, static build).
# A static binary (vkick-agent-static) is copied as it is. The host's fio,
# mke2fs and e2fsck (Debian packages fio, e2fsprogs) go in the same way.
#
# Idempotent: an up-to-date image is left alone; otherwise the staging dir is
# rebuilt from scratch. Fails loudly (set -e, every step checked).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=$src/build
kernel_dir=
force=0
log() { printf '[guest-image] %s\n' "$*"; }
die() { printf '[guest-image] ERROR: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --build-dir) build=$2; shift 2 ;;
    --build-dir=*) build=${1#*=}; shift ;;
    --kernel-dir) kernel_dir=$2; shift 2 ;;
    --kernel-dir=*) kernel_dir=${1#*=}; shift ;;
    --force) force=1; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
build=$(cd "$build" 2>/dev/null && pwd) || die "build dir does not exist (cmake -S . -B build first)"
kernel_dir=${kernel_dir:-$build/guest/kernel}
out=$build/guest
image=$out/initramfs.cpio.gz

for tool in cpio gzip ldd modinfo; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: cpio gzip libc-bin kmod)"
done
busybox=$(command -v busybox || true)
[[ -n $busybox ]] || die "busybox not found (apt-get install busybox-static)"
# (ldd exits 1 on a static binary: capture first, pipefail would hide the match)
is_static() { local o; o=$(ldd "$1" 2>&1 || true); [[ $o == *"not a dynamic executable"* ]]; }
is_static "$busybox" || die "$busybox is not static (apt-get install busybox-static)"

blk=$build/bin/vkick-blk
[[ -x $blk ]] || die "$blk not built (ninja -C $build vkick-blk)"
# vkick-agent: the static build (agent/: vkick-agent-static) when there is
# one, else the dynamic one (its libraries are copied like vkick-blk's).
agent=
for a in "$build/bin/vkick-agent-static" "$build/bin/vkick-agent"; do
  if [[ -x $a ]]; then agent=$a; break; fi
done
# Debian's fio and e2fsprogs (scripts/setup.sh installs both): load and
# filesystems on the kernel's disks. /usr/sbin is not on every user's PATH.
host_tool() {
  PATH=$PATH:/usr/sbin:/sbin command -v "$1" || die "$1 not found (apt-get install $2)"
}
fio=$(host_tool fio fio)
mke2fs=$(host_tool mke2fs e2fsprogs)
e2fsck=$(host_tool e2fsck e2fsprogs)
mke2fs_conf=/etc/mke2fs.conf
[[ -f $mke2fs_conf ]] || die "$mke2fs_conf missing (apt-get install --reinstall e2fsprogs)"
# The in-kernel driver (guest-policy/kernel/), when it has been built.
kmod=$build/guest-policy/kernel/vkick_virtio_blk.ko
[[ -f $kmod ]] || kmod=

if ! compgen -G "$kernel_dir/boot/vmlinuz-*" >/dev/null; then
  log "no guest kernel in $kernel_dir: fetching"
  "$src/scripts/fetch-guest-kernel.sh" "$kernel_dir"
fi
vmlinuz=$(ls "$kernel_dir"/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
moddir=$kernel_dir/lib/modules/$kver
[[ -d $moddir ]] || die "no modules for $kver in $moddir"
init_src=$src/tests/vm/guest-init.sh

if [[ -n $kmod ]]; then
  # A module for another kernel would only fail later, in the guest's insmod.
  kmod_ver=$(modinfo -F vermagic "$kmod" 2>/dev/null | cut -d' ' -f1) || die "modinfo $kmod failed"
  [[ $kmod_ver == "$kver" ]] ||
    die "$kmod is built for kernel '$kmod_ver', the guest runs $kver: rebuild it against linux-headers-$kver"
fi

# Up to date? (newer than every input, and made from the same set of inputs:
# an agent or module that appeared or went away since also rebuilds it)
inputs=("$src/scripts/${0##*/}" "$init_src" "$blk" "$vmlinuz" ${agent:+"$agent"} "$fio" "$mke2fs" "$e2fsck" "$mke2fs_conf" ${kmod:+"$kmod"})
inputs_list=$out/initramfs.inputs
if ((!force)) && [[ -f $image && -f $out/vmlinuz && -f $inputs_list ]] &&
    [[ $(printf '%s\n' "${inputs[@]}") == "$(cat "$inputs_list")" ]]; then
  stale=0
  for f in "${inputs[@]}"; do
    [[ $f -nt $image ]] && stale=1
  done
  if ((!stale)); then
    log "up to date: $image ($(du -h "$image" | cut -f1)), kernel $kver"
    exit 0
  fi
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/vkick-guest-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
log "staging in $stage (kernel $kver)"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib/vkick,lib64,proc,sys,dev,tmp,run,etc}
cp "$busybox" "$stage/bin/busybox"
# busybox applets as symlinks (the static build knows its own list).
for a in $("$busybox" --list); do
  [[ $a == busybox ]] && continue
  ln -sf busybox "$stage/bin/$a"
done

# Kernel modules, dependency-resolved with modinfo (the package ships no
# modules.dep: depmod runs at install time). .ko.xz/.ko.zst are unpacked here.
# ext4 (+ crc32c, which it asks the crypto API for) for the kernel driver's
# filesystem tests.
want=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
      virtio_console uio uio_pci_generic crc32c_generic ext4)
declare -A modpath=() done_=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%%.ko*}
  modpath[$n]=$f
  modpath[${n//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
order=()
resolve() {  # depth-first: dependencies first
  local m=${1//-/_}
  [[ -n ${done_[$m]:-} ]] && return 0
  local f=${modpath[$m]:-}
  if [[ -z $f ]]; then
    # built into this kernel: nothing to load
    grep -q "/$m.ko" "$moddir/modules.builtin" 2>/dev/null && { done_[$m]=1; return 0; }
    die "module $m not found in $moddir"
  fi
  done_[$m]=1
  local deps
  deps=$(modinfo -F depends "$f" 2>/dev/null) || die "modinfo $f failed"
  local d
  for d in ${deps//,/ }; do resolve "$d"; done
  order+=("$m")
}
for m in "${want[@]}"; do resolve "$m"; done
for m in "${order[@]}"; do
  f=${modpath[$m]}
  case "$f" in
    *.ko) cp "$f" "$stage/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" > "$stage/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dcq "$f" > "$stage/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$stage/lib/modules/$m.ko" ;;
  esac
done
printf '%s\n' "${order[@]}" > "$stage/lib/modules/load.order"
log "modules (load order): ${order[*]}"

# Binaries + their shared libraries and the dynamic loader.
# copy_bin SRC DEST: DEST is the path in the image (/bin/vkick-blk). A busybox
# applet of the same name elsewhere on the guest's PATH is removed, so the
# real tool wins (busybox has its own, smaller mke2fs).
dynamic_bins=()
unshadow() {
  local d
  for d in bin sbin usr/bin usr/sbin; do
    [[ /$d/$1 != "$2" && -L $stage/$d/$1 && $(readlink "$stage/$d/$1") == busybox ]] && rm -f "$stage/$d/$1"
  done
  return 0
}
copy_bin() {
  local bin=$1 dest=$2 name=${2##*/}
  [[ ! -L $stage$dest ]] || rm -f "$stage$dest"   # never write through an applet link
  cp "$bin" "$stage$dest"
  strip --strip-debug "$stage$dest" 2>/dev/null || true
  unshadow "$name" "$dest"
  if is_static "$bin"; then
    log "$name: static"
    return 0
  fi
  dynamic_bins+=("$dest")
  local n=0 lib
  while read -r lib; do
    [[ -n $lib ]] || continue
    [[ -f $lib ]] || die "$name needs $lib, which does not exist"
    case "$lib" in
      */ld-linux*) mkdir -p "$stage/lib64" "$stage/lib/x86_64-linux-gnu"
                   cp -L "$lib" "$stage/lib64/$(basename "$lib")"
                   cp -L "$lib" "$stage/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
      *) [[ -f $stage/lib/vkick/$(basename "$lib") ]] || { cp -L "$lib" "$stage/lib/vkick/"; n=$((n + 1)); } ;;
    esac
  done < <(ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/.*ld-linux/{print $1}')
  log "$name: dynamic, $n new shared libraries copied"
}
copy_bin "$blk" /bin/vkick-blk
copy_bin "$fio" /usr/bin/fio
copy_bin "$mke2fs" /usr/sbin/mke2fs
ln -s mke2fs "$stage/usr/sbin/mkfs.ext4"   # mke2fs takes the fs type from its name
unshadow mkfs.ext4 /usr/sbin/mkfs.ext4
copy_bin "$e2fsck" /usr/sbin/e2fsck
cp "$mke2fs_conf" "$stage/etc/mke2fs.conf"
ln -s /proc/self/mounts "$stage/etc/mtab"     # e2fsprogs' "is it mounted?" check
if [[ -n $agent ]]; then
  copy_bin "$agent" /bin/vkick-agent
else
  # HOOK: vkick-agent (agent/) was not built in $build when this image was
  # made; rebuild the image after `ninja -C $build vkick-agent` to include it.
  log "vkick-agent not built in $build: image has no agent (rebuild after building it)"
fi
if [[ -n $kmod ]]; then
  mkdir -p "$stage/lib/modules/vkick"
  cp "$kmod" "$stage/lib/modules/vkick/vkick_virtio_blk.ko"
  log "vkick_virtio_blk.ko: $kmod -> /lib/modules/vkick/ (vkick.kmod=1 loads it)"
else
  log "vkick_virtio_blk.ko not built ($build/guest-policy/kernel/): image has no vkick kernel module (vkick.kmod=1 will say so)"
fi
strip --strip-unneeded "$stage"/lib/vkick/*.so* 2>/dev/null || true
log "shared libraries: $(ls "$stage/lib/vkick" | wc -l) in /lib/vkick ($(du -sh "$stage/lib/vkick" | cut -f1))"
# Smoke check: the staged loader resolves every dynamic binary from the staged
# libraries alone (the host's own library dirs would hide a missing one, so
# every resolved path must be inside the staging dir).
if ((${#dynamic_bins[@]})); then
  [[ -x $stage/lib64/ld-linux-x86-64.so.2 ]] || die "dynamic loader not staged"
  for b in "${dynamic_bins[@]}"; do
    resolved=$("$stage/lib64/ld-linux-x86-64.so.2" --library-path "$stage/lib/vkick" --list "$stage$b" 2>&1) ||
      die "$b: the staged loader cannot list it: $resolved"
    outside=$(awk -v s="$stage/" '/=>/ && index($3, s) != 1 {print $1 " => " $3 " " $4}' <<<"$resolved")
    [[ -z $outside ]] || die "$b has libraries not in the staged image: $outside"
  done
fi

install -m 0755 "$init_src" "$stage/init"
echo "vkick-guest $kver $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$stage/etc/vkick-image"

mkdir -p "$out"
(cd "$stage" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) | gzip -1 > "$image.tmp"
mv "$image.tmp" "$image"
printf '%s\n' "${inputs[@]}" > "$inputs_list"
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
log "ready: $image ($(du -h "$image" | cut -f1)), kernel $out/vmlinuz ($kver)"
