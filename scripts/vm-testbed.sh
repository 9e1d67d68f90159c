#!/usr/bin/env bash
# The VM testbed (docs/testbed-vm.md): Debian's kernel + the vkick initramfs in
# QEMU, a vhost-user-blk-pci disk served by qemu-storage-daemon (file backend),
# a plain virtio-blk-pci disk for the kernel's own driver, a virtio-serial port
# for vkick-agent and a QMP socket for vkickd.
#
#   scripts/vm-testbed.sh [--accel tcg|kvm] [--build-dir DIR] [--run "CMD"]
#                         [--run-file FILE] [--qmp PATH] [--keep] [--paused]
#                         [--tmpdir DIR] [--queues N] [--smp N] [--timeout S]
#                         [--shell] [--append ARGS] [--initrd-add CPIO_GZ]
#
#   --accel     tcg (default: what runs a 64-bit guest everywhere) or kvm (a real
#               VMX/SVM host: -enable-kvm -cpu host)
#   --build-dir where guest/initramfs.cpio.gz is (built if missing; default build)
#   --run CMD   shell text run in the guest after set-up (appended to the initrd as
#               /etc/vkick-run.sh; /init sources it in
#               a subshell; `vkick_step NAME CMD...` frames a command's output)
#   --run-file  the same, from a file
#   --qmp PATH  QMP socket for vkickd (default <tmp>/qmp.sock). The script keeps
#               its own second socket <tmp>/qmp-ctl.sock (a QMP socket takes one
#               client at a time)
#   --paused    start QEMU stopped (-S): attach vkickd to --qmp, then send
#               {"execute":"cont"} on <tmp>/qmp-ctl.sock
#   --tmpdir    use this dir for sockets, disks and logs (kept afterwards)
#   --keep      keep the temp dir (default: removed on exit)
#   --queues    vhost-user-blk queues (default 2)
#   --smp       guest vCPUs (default 1). Linux's virtio-blk drivers use at most
#               one queue per vCPU; virtio-blk-pci's num-queues follows -smp
#   --timeout   kill QEMU after this many seconds (default 900)
#   --shell     serial console on this terminal, shell in the guest after the run
#   --append    more kernel command line for the guest, e.g. 'vkick.kmod=1'
#               (tests/vm/guest-init.sh lists the vkick.* options)
#   --initrd-add  a gzip'ed newc cpio archive appended to the initramfs (files
#               added to the guest, e.g. an unpacked .deb: tests/package)
#
# Exit status: the guest run script's status (=== VKICK-RUN END rc=N ===), 1 when
# the guest failed to set up or QEMU died, 124 on timeout. Processes started here
# (qemu-storage-daemon, QEMU, the log follower) are stopped by PID on exit.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
accel=tcg build=$src/build run='' qmp='' keep=0 paused=0 tmp='' queues=2 smp=1 timeout=900 shell=0 extra_append='' initrd_add=''
log() { printf '[vm-testbed] %s\n' "$*" >&2; }
die() { printf '[vm-testbed] ERROR: %s\n' "$*" >&2; exit 1; }
while (($#)); do
  case "$1" in
    --accel) accel=$2; shift 2 ;;
    --accel=*) accel=${1#*=}; shift ;;
    --build-dir) build=$2; shift 2 ;;
    --build-dir=*) build=${1#*=}; shift ;;
    --run) run=$2; shift 2 ;;
    --run=*) run=${1#*=}; shift ;;
    --run-file) run=$(cat "$2"); shift 2 ;;
    --run-file=*) run=$(cat "${1#*=}"); shift ;;
    --qmp) qmp=$2; shift 2 ;;
    --qmp=*) qmp=${1#*=}; shift ;;
    --keep) keep=1; shift ;;
    --paused) paused=1; shift ;;
    --tmpdir) tmp=$2; shift 2 ;;
    --tmpdir=*) tmp=${1#*=}; shift ;;
    --queues) queues=$2; shift 2 ;;
    --queues=*) queues=${1#*=}; shift ;;
    --smp) smp=$2; shift 2 ;;
    --smp=*) smp=${1#*=}; shift ;;
    --timeout) timeout=$2; shift 2 ;;
    --timeout=*) timeout=${1#*=}; shift ;;
    --shell) shell=1; shift ;;
    --append) extra_append=$2; shift 2 ;;
    --append=*) extra_append=${1#*=}; shift ;;
    --initrd-add) initrd_add=$2; shift 2 ;;
    --initrd-add=*) initrd_add=${1#*=}; shift ;;
    -h | --help) sed -n '2,37p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$accel" in tcg | kvm) ;; *) die "--accel must be tcg or kvm" ;; esac
[[ $queues =~ ^[0-9]+$ ]] && ((queues >= 1 && queues <= 16)) || die "--queues must be 1..16"
[[ $smp =~ ^[0-9]+$ ]] && ((smp >= 1 && smp <= 16)) || die "--smp must be 1..16"
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
qsd=$(command -v qemu-storage-daemon) || die "qemu-storage-daemon not found (apt-get install qemu-system-common)"
if [[ $accel == kvm ]]; then
  [[ -r /dev/kvm && -w /dev/kvm ]] || die "--accel kvm: /dev/kvm is not usable"
fi

build=$(cd "$build" && pwd)
guest=$build/guest
"$src/scripts/build-guest-image.sh" --build-dir "$build" >&2

owned_tmp=0
if [[ -z $tmp ]]; then
  tmp=$(mktemp -d /tmp/vkick-vm.XXXXXX)
  owned_tmp=1
else
  mkdir -p "$tmp"
  tmp=$(cd "$tmp" && pwd)
fi
qmp=${qmp:-$tmp/qmp.sock}
qmp_ctl=$tmp/qmp-ctl.sock
serial=$tmp/serial.log
agent_sock=$tmp/agent.sock
test_sock=$tmp/test.sock
vu_sock=$tmp/vhost-user-blk.sock
qsd_pid='' qemu_pid='' tail_pid=''

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p left
  # Our own children only, by PID: TERM all, up to 2 s, then KILL.
  for p in $tail_pid $qemu_pid $qsd_pid; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 20); do
    left=
    for p in $tail_pid $qemu_pid $qsd_pid; do kill -0 "$p" 2>/dev/null && left=1; done
    [[ -z $left ]] && break
    sleep 0.1
  done
  for p in $tail_pid $qemu_pid $qsd_pid; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((owned_tmp && !keep)); then
    rm -rf "$tmp"
  else
    log "kept $tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Disks: the vhost-user one (file backend, served by qemu-storage-daemon) and
# a plain virtio-blk-pci one for the guest kernel's virtio_blk.
truncate -s 256M "$tmp/vkblk0.img"
truncate -s 64M "$tmp/vblk1.img"
"$qsd" --blockdev "driver=file,node-name=vkblk0disk,filename=$tmp/vkblk0.img,cache.direct=off" \
  --export "type=vhost-user-blk,id=vkblk0exp,node-name=vkblk0disk,addr.type=unix,addr.path=$vu_sock,num-queues=$queues,writable=on" \
  > "$tmp/qsd.log" 2>&1 &
qsd_pid=$!
echo "$qsd_pid" > "$tmp/qsd.pid"
for _ in $(seq 100); do
  [[ -S $vu_sock ]] && break
  kill -0 "$qsd_pid" 2>/dev/null || { cat "$tmp/qsd.log" >&2; die "qemu-storage-daemon exited"; }
  sleep 0.1
done
[[ -S $vu_sock ]] || die "qemu-storage-daemon socket did not appear"

append="console=ttyS0 quiet panic=-1 vkick.pci=0000:00:04.0 vkick.hugepages=64"
initrd=$guest/initramfs.cpio.gz
if [[ -n $initrd_add ]]; then
  [[ -f $initrd_add ]] || die "--initrd-add: $initrd_add does not exist"
  cat "$initrd" "$initrd_add" > "$tmp/initrd-added.img"
  initrd=$tmp/initrd-added.img
fi
if [[ -n $run ]]; then
  # The run script travels as a second cpio archive appended to the initramfs
  # (the kernel unpacks concatenated archives): no command-line length limit.
  mkdir -p "$tmp/runfs/etc"
  printf '%s\n' "$run" > "$tmp/runfs/etc/vkick-run.sh"
  (cd "$tmp/runfs" && echo etc/vkick-run.sh | cpio -o -H newc --quiet) | gzip -1 > "$tmp/run.cpio.gz"
  cat "$initrd" "$tmp/run.cpio.gz" > "$tmp/initrd.img"
  initrd=$tmp/initrd.img
fi
((shell)) && append+=" vkick.shell=1"
[[ -n $extra_append ]] && append+=" $extra_append"

if [[ $accel == kvm ]]; then
  accel_args=(-accel kvm -cpu host)
else
  accel_args=(-accel tcg -cpu max)
fi
if ((shell)); then
  serial_args=(-serial mon:stdio)
else
  serial_args=(-serial "file:$serial")
fi
: > "$serial"
# shellcheck disable=SC2054  # commas are QEMU option syntax
argv=("$qemu" -name vkick-vm -machine pc "${accel_args[@]}" -smp "$smp"
  -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
  -nodefaults -display none -no-reboot -nic none "${serial_args[@]}"
  -kernel "$guest/vmlinuz" -initrd "$initrd" -append "$append"
  -qmp "unix:$qmp,server=on,wait=off" -qmp "unix:$qmp_ctl,server=on,wait=off"
  -pidfile "$tmp/qemu.pid"
  -chardev "socket,id=vkblk0c,path=$vu_sock"
  -device "vhost-user-blk-pci,chardev=vkblk0c,num-queues=$queues,queue-size=256,id=vkblk0,addr=0x4"
  -drive "file=$tmp/vblk1.img,format=raw,if=none,id=vblk1drv,cache=unsafe"
  -device "virtio-blk-pci,drive=vblk1drv,id=vblk1,addr=0x5"
  -device "virtio-serial-pci,id=vser0,addr=0x6"
  -chardev "socket,id=vkickagent0,path=$agent_sock,server=on,wait=off"
  -device "virtserialport,chardev=vkickagent0,name=org.vkick.agent.0"
  -chardev "socket,id=vkicktest0,path=$test_sock,server=on,wait=off"
  -device "virtserialport,chardev=vkicktest0,name=org.vkick.test.0")
((paused)) && argv+=(-S)
printf '%q ' "${argv[@]}" > "$tmp/qemu.cmdline"
if ((shell)); then
  # Interactive: QEMU in the foreground owns the terminal (serial + monitor,
  # Ctrl-A X quits); a background job could not read it.
  log "QMP (vkickd): $qmp   agent socket: $agent_sock   (serial on this terminal)"
  ((paused)) && log "QEMU is paused (-S): send {\"execute\":\"cont\"} on $qmp_ctl"
  rc=0
  "${argv[@]}" || rc=$?
  exit "$rc"
fi
"${argv[@]}" > "$tmp/qemu.log" 2>&1 < /dev/null &
qemu_pid=$!
for _ in $(seq 100); do
  [[ -S $qmp && -S $qmp_ctl ]] && break
  kill -0 "$qemu_pid" 2>/dev/null || { cat "$tmp/qemu.log" >&2; die "QEMU exited at start-up"; }
  sleep 0.1
done
cat >&2 <<EOF
[vm-testbed] QEMU pid $qemu_pid ($accel, $smp vCPU), qemu-storage-daemon pid $qsd_pid
[vm-testbed]   QMP (vkickd):  $qmp
[vm-testbed]   QMP (control): $qmp_ctl
[vm-testbed]   serial log:    $serial
[vm-testbed]   agent socket:  $agent_sock   (virtserialport org.vkick.agent.0; vkickd connects)
[vm-testbed]   test socket:   $test_sock   (virtserialport org.vkick.test.0: scripts/tests talk to the run script)
[vm-testbed]   vhost-user:    $vu_sock (device vkblk0 at 0000:00:04.0, $queues queues)
[vm-testbed]   kernel disk:   vblk1 at 0000:00:05.0
EOF
((paused)) && log "QEMU is paused (-S): send {\"execute\":\"cont\"} on $qmp_ctl"
echo "$qemu_pid" > "$tmp/vm-testbed.qemu.pid"

tail -n +1 -f --pid="$qemu_pid" "$serial" &
tail_pid=$!
start=$SECONDS
while kill -0 "$qemu_pid" 2>/dev/null; do
  if ((SECONDS - start > timeout)); then
    log "timeout after ${timeout}s: stopping QEMU"
    exit 124
  fi
  sleep 0.5
done
wait "$qemu_pid" || true
qemu_pid=
sleep 0.3
if grep -q '=== VKICK-GUEST FAILED' "$serial"; then
  log "guest set-up failed: $(grep -a '=== VKICK-GUEST FAILED' "$serial")"
  exit 1
fi
rc=$(grep -a -o '=== VKICK-RUN END rc=[0-9]*' "$serial" | tail -1 | sed 's/.*rc=//')
if [[ -n $run && -z $rc ]]; then
  log "the guest powered off without finishing the run script (see $serial)"
  exit 1
fi
log "guest done in $((SECONDS - start))s, run rc=${rc:-none}"
exit "${rc:-0}"
