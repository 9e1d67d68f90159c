"""The VM testbed (scripts/vm-testbed.sh, docs/testbed-vm.md) from a test:
the guest image, one paused boot with vkickd attached over QMP, the guest's
serial log, host counts that have settled, vkickctl status, and a command
channel into the guest over its test port (org.vkick.test.0).

Shared by tests/vm/test_vm_e2e.py and tests/vm/test_vm_kmod.py."""

import base64
import json
import os
import re
import subprocess
import sys
import time

from .qmp import QmpClient
from .serial import SerialConsole
from .util import Fatal, build_dir, require_binary, require_root, skip, source_dir, vkickd_path, wait_until
from .vkickd import Vkickd

VM_NAME = "vkick-vm"           # vm-testbed.sh: QEMU -name
VHOST_DEVICE = "vkblk0"        # vhost-user-blk-pci (qemu-storage-daemon), 2 queues by default
VHOST_PCI = "0000:00:04.0"
KERNEL_DEVICE = "vblk1"        # plain virtio-blk-pci (the guest kernel's virtio_blk)
KERNEL_PCI = "0000:00:05.0"
KMOD_PATH = os.path.join("guest-policy", "kernel", "vkick_virtio_blk.ko")  # under the build dir


def require_vm_testbed():
    """What both VM tests need on the host (skips with the reason otherwise);
    returns (build dir, vkickctl path)."""
    require_root()
    require_binary("qemu-system-x86_64")
    require_binary("qemu-storage-daemon")
    if not os.path.isdir("/sys/kernel/tracing/events/syscalls") and \
            not os.path.isdir("/sys/kernel/debug/tracing/events/syscalls"):
        skip("tracefs syscalls events not available (vkickd counts vhost-user kicks on "
             "syscalls:sys_enter_write; run scripts/host-prep.sh)")
    bdir = os.path.abspath(build_dir())
    vkickd_path()
    vkickctl = os.path.join(bdir, "bin", "vkickctl")
    if not os.access(vkickctl, os.X_OK):
        raise AssertionError("vkickctl not built at %s (build target 'vkickctl')" % vkickctl)
    return bdir, vkickctl


def read_text(path):
    """A log file as text ('' when missing); the serial log's CRLF made LF."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r", "")  # ttyS0: CRLF
    except OSError:
        return ""


def ensure_guest_image(bdir, kmod=False):
    """Kernel (fetched if needed; missing = skip), vkick-blk and the agent
    (missing = a broken build), with kmod the module (missing = skip: it
    needs the guest kernel's headers), then the initramfs (built)."""
    kdir = os.path.join(bdir, "guest", "kernel")
    if not os.path.isdir(os.path.join(kdir, "boot")):
        r = subprocess.run([os.path.join(source_dir(), "scripts", "fetch-guest-kernel.sh"), kdir],
                           capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isdir(os.path.join(kdir, "boot")):
            skip("guest kernel missing in %s and fetch-guest-kernel.sh failed: %s" % (
                kdir, (r.stderr or r.stdout).strip()[-300:]))
    blk = os.path.join(bdir, "bin", "vkick-blk")
    if not os.access(blk, os.X_OK):
        raise AssertionError("vkick-blk not built at %s (build target 'vkick-blk')" % blk)
    if not any(os.access(os.path.join(bdir, "bin", b), os.X_OK)
               for b in ("vkick-agent-static", "vkick-agent")):
        raise AssertionError("vkick-agent not built in %s/bin (build target 'vkick-agent-static')"
                             % bdir)
    if kmod and not os.path.exists(os.path.join(bdir, KMOD_PATH)):
        skip("vkick_virtio_blk.ko not built at %s (target 'vkick_virtio_blk_ko'; needs the guest "
             "kernel's linux-headers, scripts/fetch-guest-kernel.sh)" % os.path.join(bdir, KMOD_PATH))
    r = subprocess.run([os.path.join(source_dir(), "scripts", "build-guest-image.sh"),
                        "--build-dir", bdir], capture_output=True, text=True)
    sys.stdout.write(r.stdout + r.stderr)
    assert r.returncode == 0, "build-guest-image.sh failed (rc %d)" % r.returncode


def stable_counts(vk, keys, vm=VM_NAME, settle=1.0, timeout=30):
    """{(device, queue): count} of `keys`, once two scrapes `settle` s apart agree."""
    deadline = time.monotonic() + timeout
    prev = None
    while time.monotonic() < deadline:
        c = {k: v for k, v in vk.queue_counts(vk.metrics(), vm).items() if k in keys}
        if c == prev and set(c) == set(keys):
            return c
        prev = c
        time.sleep(settle)
    raise AssertionError("host counts did not settle: %r" % prev)


def status_rows(vkickctl, admin, device):
    """vkickctl status --json rows of `device` ([] when vkickctl fails)."""
    r = subprocess.run([vkickctl, "--socket=%s" % admin, "status", "--json"],
                       capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return []
    return [q for q in json.loads(r.stdout)["queues"] if q["device"] == device]


class TestbedVm:
    """One boot of scripts/vm-testbed.sh --paused in a Testbed: vkickd
    (started with `vkickd_extra`) attaches to QEMU's QMP socket and sees the
    series of `keys` ({(device, queue)}) before `cont`, so it labels every
    kick fd from QEMU's first SET_VRING_KICK. Attributes: vk (Vkickd),
    ctl (QmpClient on qmp-ctl.sock), vmdir, qemu_pid, t_cont."""

    def __init__(self, tb, bdir, script, keys, vkickd_extra=(), append=None, smp=None,
                 timeout=300, testbed_extra=()):
        self.tb = tb
        self.vmdir = tb.path("vm")
        qmp = tb.path("qmp-vkickd.sock")
        argv = [os.path.join(source_dir(), "scripts", "vm-testbed.sh"), "--accel", "tcg",
                "--build-dir", bdir, "--tmpdir", self.vmdir, "--qmp", qmp, "--paused",
                "--timeout", str(timeout), "--run", script]
        if append:
            argv += ["--append", append]
        if smp:
            argv += ["--smp", str(smp)]
        argv += list(testbed_extra)
        self.proc = tb.spawn("vm-testbed", argv)
        pidfile = os.path.join(self.vmdir, "qemu.pid")
        self.serial_path = os.path.join(self.vmdir, "serial.log")

        def sockets_up():
            self._check_alive()
            return all(os.path.exists(p)
                       for p in (pidfile, qmp, os.path.join(self.vmdir, "qmp-ctl.sock")))
        wait_until(sockets_up, 60, "QEMU sockets")
        self.qemu_pid = int(read_text(pidfile).strip())
        self.vk = Vkickd(tb, [qmp], extra=list(vkickd_extra))
        self.vk.wait_vm(VM_NAME, self.qemu_pid, timeout=60)
        self.vk.wait_metric("series for %s" % sorted(keys),
                            lambda m: set(keys) <= set(self.vk.queue_counts(m, VM_NAME)), 60)
        self.ctl = QmpClient(os.path.join(self.vmdir, "qmp-ctl.sock"))
        tb.callback(self.ctl.close)
        self.ctl.execute("cont")
        self.t_cont = time.monotonic()

    def path(self, name):
        return os.path.join(self.vmdir, name)

    def serial(self):
        return read_text(self.serial_path)

    def alive(self):
        return self.proc.alive()

    def _check_alive(self):
        if not self.proc.alive():
            raise Fatal("vm-testbed.sh exited (rc %s):\n%s" % (self.proc.returncode(),
                                                                 self.proc.tail()))

    def wait_marker(self, marker, timeout):
        """Wait for `marker` in the serial log; Fatal when the guest stops first."""
        def seen():
            t = self.serial()
            if marker in t:
                return True
            if "VKICK-GUEST FAILED" in t or not self.proc.alive():
                raise Fatal("guest stopped before %r:\n%s" % (marker, t[-3000:]))
            return False
        wait_until(seen, timeout, marker, interval=0.2)

    def boot_log(self):
        """'guest ready Ns after cont (kernel up at Ms guest time)'."""
        up = re.search(r"VKICK-GUEST: up ([0-9.]+)s", self.serial())
        return "guest ready %.1fs after cont (kernel up at %ss guest time)" % (
            time.monotonic() - self.t_cont, up and up.group(1))


# ------------------------------------------------- a command channel into the guest

# The guest's end (a --run script): reads "<id> <base64 of a shell script>"
# lines on org.vkick.test.0, runs each with sh (stdin /dev/null, the port
# closed), answers on the same port with the output framed by
# "=== VKICK-CMD <id> BEGIN/END rc=N ===". "quit" ends it (the run script's
# status: 0). A read gets EOF at once while the host side is not connected:
# it polls. Background jobs a command starts outlive it (their output must go
# to files: the command's own output is a file read after it exits).
GUEST_SHELL_SCRIPT = r"""
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = org.vkick.test.0 ] && port=/dev/$(basename $p)
done
[ -n "$port" ] || { echo "no test port"; exit 3; }
%s
exec 3<>"$port"
echo "=== VKICK-SHELL READY ==="
while :; do
  if ! IFS= read -r line <&3; then sleep 0.1; continue; fi
  id=${line%%%% *}
  [ "$id" = quit ] && break
  echo "${line#* }" | base64 -d > /run/cmd.sh 2>/dev/null || echo "echo bad command line; exit 2" > /run/cmd.sh
  sh /run/cmd.sh > /run/cmd.out 2>&1 < /dev/null 3>&-
  rc=$?
  { echo "=== VKICK-CMD $id BEGIN ==="; cat /run/cmd.out; echo "=== VKICK-CMD $id END rc=$rc ==="; } >&3
done
exec 3>&-
echo "=== VKICK-SHELL QUIT ==="
exit 0
"""


def guest_shell_script(prelude=""):
    """The run script for GuestShell; `prelude` runs once before the loop."""
    return GUEST_SHELL_SCRIPT % prelude


class GuestShell:
    """The host's end of GUEST_SHELL_SCRIPT (connect after the guest printed
    === VKICK-SHELL READY === on its serial log)."""

    def __init__(self, tb, test_sock):
        self.con = SerialConsole(test_sock)
        tb.callback(self.con.close)
        self.n = 0

    def run(self, script, timeout=60):
        """(rc, output) of a shell script run in the guest."""
        self.n += 1
        cid = str(self.n)
        self.con.send(("%s %s\n" % (cid, base64.b64encode(script.encode()).decode())).encode())
        end = "=== VKICK-CMD %s END rc=" % cid
        try:
            text = self.con.wait_for(end, timeout)
        except AssertionError as e:
            raise AssertionError("guest command %s (%r...) did not finish within %ss: %s" % (
                cid, script[:200], timeout, str(e)[-2000:]))
        m = re.search(r"=== VKICK-CMD %s BEGIN ===\n(.*?)=== VKICK-CMD %s END rc=(\d+) ===" % (
            cid, cid), text.replace("\r", ""), re.S)
        assert m, "guest command %s: unframed answer:\n%s" % (cid, text[-2000:])
        return int(m.group(2)), m.group(1)

    def check(self, script, timeout=60):
        """The output of a script that must exit 0."""
        rc, out = self.run(script, timeout)
        if rc != 0:
            raise AssertionError("guest command failed (rc %d): %s\n--- output ---\n%s" % (
                rc, script.strip()[:500], out[-3000:]))
        return out

    def quit(self):
        self.con.send(b"quit\n")
