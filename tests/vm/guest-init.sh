#!/bin/sh
# /init of the vkick VM testbed guest (busybox-static initramfs built by
# scripts/build-guest-image.sh; docs/testbed-vm.md).
#
# Kernel command line (all optional):
#   vkick.pci=0000:00:04.0   vhost-user-blk-pci device to hand to uio_pci_generic
#   vkick.hugepages=N        2 MiB hugepages to reserve (default 64)
#   vkick.run64=BASE64       shell script to run (base64 of its text, so
#                            spaces/quotes survive the command line)
# The script to run can also come as /etc/vkick-run.sh, from a second cpio
# archive appended to the initramfs (what scripts/vm-testbed.sh --run does;
# it wins over vkick.run64). It runs in a subshell of /init, so it can call
# vkick_step NAME CMD... (output between markers).
#   vkick.shell=1            drop to a shell on ttyS0 instead of powering off
#   vkick.kmod=1             after the virtio stack (virtio_blk first, so it
#                            owns the disks), insmod
#                            /lib/modules/vkick/vkick_virtio_blk.ko (in the
#                            image when it was built; a missing one is logged)
# Tools: busybox applets in /bin, vkick-blk (+ vkick-agent) in /bin, Debian's
# fio in /usr/bin, mke2fs/mkfs.ext4/e2fsck in /usr/sbin (the image has no
# busybox mke2fs applet); dynamic ones find their libraries in /lib/vkick
# (LD_LIBRARY_PATH). /tmp is a tmpfs.
# Output protocol on ttyS0 (parsed by tests/vm/test_vm_e2e.py):
#   VKICK-GUEST: <progress line>
#   === VKICK-STEP <name> BEGIN ===  ... output ...  === VKICK-STEP <name> END rc=<n> ===
#   === VKICK-RUN END rc=<n> ===     (rc of the whole run script)
#   === VKICK-GUEST FAILED: <why> === (set-up failed; nothing was run)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/vkick

say() { echo "VKICK-GUEST: $*"; }
die() {
  echo "=== VKICK-GUEST FAILED: $* ==="
  finish 1
}
finish() {
  sync
  if [ "$shell" = 1 ]; then
    say "vkick.shell=1: starting a shell (exit or 'poweroff -f' to stop)"
    setsid cttyhack sh
  fi
  poweroff -f
  sleep 5
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/hugepages /tmp /sys/kernel/tracing /sys/fs/bpf /run
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=64m shm /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp   # writable scratch (fio files); no size= : half of RAM
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "no tracefs"
mount -t bpf bpf /sys/fs/bpf 2>/dev/null || say "no bpffs"
mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null || say "no hugetlbfs"

pci=0000:00:04.0
hugepages=64
run64=
shell=0
kmod=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vkick.pci=*) pci=${arg#vkick.pci=} ;;
    vkick.hugepages=*) hugepages=${arg#vkick.hugepages=} ;;
    vkick.run64=*) run64=${arg#vkick.run64=} ;;
    vkick.shell=*) shell=${arg#vkick.shell=} ;;
    vkick.kmod=*) kmod=${arg#vkick.kmod=} ;;
  esac
done
say "up $(cut -d' ' -f1 /proc/uptime)s kernel $(uname -r) pci=$pci hugepages=$hugepages kmod=$kmod"

# Modules in dependency order (build-guest-image.sh resolved them with modinfo).
# uio_pci_generic first, and the device's driver_override set before virtio_pci
# loads, so virtio_pci/virtio_blk never claim the vhost-user-blk-pci device.
load() {
  f=/lib/modules/$1.ko
  [ -f "$f" ] || die "module $1 not in the initramfs"
  grep -q "^$1 " /proc/modules && return 0
  insmod "$f" || die "insmod $1"
}
load uio
load uio_pci_generic

dev=/sys/bus/pci/devices/$pci
[ -d "$dev" ] || die "no PCI device $pci (QEMU -device vhost-user-blk-pci,addr=...)"
vendor=$(cat "$dev/vendor") device=$(cat "$dev/device")
case "$vendor:$device" in
  0x1af4:0x1001 | 0x1af4:0x1042) ;;
  *) die "$pci is $vendor:$device, not virtio-blk (1af4:1001/1042)" ;;
esac
echo uio_pci_generic > "$dev/driver_override"
if [ -e "$dev/driver" ] && [ "$(basename "$(readlink "$dev/driver")")" != uio_pci_generic ]; then
  echo "$pci" > "$dev/driver/unbind"
fi
[ -e "$dev/driver" ] || echo "$pci" > /sys/bus/pci/drivers_probe
[ "$(basename "$(readlink "$dev/driver")")" = uio_pci_generic ] || die "$pci did not bind to uio_pci_generic"
uio=$(ls "$dev/uio" 2>/dev/null | head -1)
[ -n "$uio" ] && [ -c "/dev/$uio" ] || die "no /dev/uioN for $pci"
say "$pci ($vendor:$device) bound to uio_pci_generic as /dev/$uio"

for m in $(cat /lib/modules/load.order); do
  case "$m" in uio | uio_pci_generic) continue ;; esac
  load "$m"
done
# virtio_blk took the plain virtio-blk-pci disk (if any), virtio_console the agent port.
for b in /sys/block/vd*; do [ -e "$b" ] && say "kernel disk $(basename "$b") $(cat "$b/size") sectors"; done
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && say "virtio port $(basename "$p") name $(cat "$p/name")"
done

# vkick.kmod=1: the in-kernel driver (guest-policy/kernel/, docs/kernel-driver.md),
# loaded after virtio_blk, so the stock driver owns every disk until one is moved.
if [ "$kmod" = 1 ]; then
  f=/lib/modules/vkick/vkick_virtio_blk.ko
  if [ ! -f "$f" ]; then
    say "vkick.kmod=1: $f MISSING (not built when the image was made): not loaded"
  elif grep -q '^vkick_virtio_blk ' /proc/modules; then
    say "vkick.kmod=1: vkick_virtio_blk already loaded"
  else
    insmod "$f" || die "vkick.kmod=1: insmod $f failed"
    say "vkick.kmod=1: vkick_virtio_blk loaded"
  fi
fi

echo "$hugepages" > /proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" -ge 1 ] || die "could not reserve 2 MiB hugepages (asked $hugepages, got $got)"
say "hugepages: $got x 2 MiB"

# Keep kernel messages off the console from here on: results are parsed.
echo 1 > /proc/sys/kernel/printk

vkick_step() {
  name=$1
  shift
  echo "=== VKICK-STEP $name BEGIN ==="
  "$@"
  rc=$?
  echo "=== VKICK-STEP $name END rc=$rc ==="
  return $rc
}

# Hook: vkick-agent, when the image has it (built from agent/ if the target
# existed when build-guest-image.sh ran). The run script starts it itself
# (e.g. `vkick-agent &`: it finds the port named org.vkick.agent.0 itself);
# nothing is started by default.
[ -x /bin/vkick-agent ] && say "vkick-agent present"

if [ -f /etc/vkick-run.sh ]; then
  cp /etc/vkick-run.sh /run/vkick-run.sh
elif [ -n "$run64" ]; then
  echo "$run64" | base64 -d > /run/vkick-run.sh 2>/dev/null || die "vkick.run64 is not valid base64"
fi
if [ -f /run/vkick-run.sh ]; then
  say "running the run script ($(wc -c < /run/vkick-run.sh) bytes) at $(cut -d' ' -f1 /proc/uptime)s"
  (. /run/vkick-run.sh)
  rc=$?
  echo "=== VKICK-RUN END rc=$rc ==="
else
  say "no run script given: nothing to run"
fi
say "done at $(cut -d' ' -f1 /proc/uptime)s"
finish 0
