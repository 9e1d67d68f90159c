"""QEMU and qemu-storage-daemon under test: unique sockets in the testbed's
temp dir, started by the testbed (so always stopped by PID and cleaned up)."""

import os
import re

from .qmp import QmpClient
from .serial import SerialConsole
from .util import Fatal, guest_elf, require_binary, wait_until


class QemuVm:
    """A QEMU VM running notify-guest.

    Two QMP sockets: `qmp_vkickd` for vkickd (a QEMU monitor takes one client
    at a time) and `qmp_test` for the test itself. COM1 is a unix socket so
    the test can read the guest's summary and send it go/quit bytes."""

    def __init__(self, tb, name, accel, devices, append, mem_mb=64, shared_mem=False,
                 extra=(), tag=None):
        """`tag` names the sockets and the process (default: `name`): a
        migration destination has the source's -name and sockets of its own."""
        self.tb = tb
        self.name = name
        tag = tag or name
        self.qmp_vkickd = tb.path("%s-qmp-vkickd.sock" % tag)
        self.qmp_test = tb.path("%s-qmp-test.sock" % tag)
        self.serial_path = tb.path("%s-serial.sock" % tag)
        argv = [require_binary("qemu-system-x86_64"), "-name", name, "-S",
                "-nodefaults", "-display", "none", "-no-reboot", "-m", "%dM" % mem_mb,
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_vkickd,
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_test,
                "-chardev", "socket,id=ser0,path=%s,server=on,wait=off" % self.serial_path,
                "-serial", "chardev:ser0",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        if accel == "kvm":
            argv += ["-enable-kvm", "-cpu", "qemu64"]
        else:
            argv += ["-accel", "tcg", "-cpu", "qemu64"]
        if shared_mem:
            # vhost-user backends map guest RAM: it must be a shareable fd.
            argv += ["-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % mem_mb,
                     "-machine", "pc,memory-backend=mem"]
        else:
            argv += ["-machine", "pc"]
        for d in devices:
            argv += list(d)
        argv += list(extra)
        argv += ["-kernel", guest_elf(), "-append", append]
        self.proc = tb.spawn("qemu-" + tag, argv)
        self.pid = self.proc.pid
        # The sockets appear once QEMU has parsed its options.
        wait_until(lambda: all(os.path.exists(p) for p in
                               (self.qmp_vkickd, self.qmp_test, self.serial_path))
                   or self._check_alive(), 30, "QEMU %s sockets" % name)
        self.qmp = QmpClient(self.qmp_test)
        tb.callback(self.qmp.close)
        self.serial = SerialConsole(self.serial_path)
        tb.callback(self.serial.close)

    def _check_alive(self):
        if not self.proc.alive():
            raise Fatal("QEMU %s exited early (rc %s):\n%s" % (
                self.name, self.proc.returncode(), self.proc.tail()))
        return False

    def cont(self):
        self.qmp.execute("cont")

    def guest_sent(self):
        """The guest's own summary: {(slot, queue): (count, 'mmio:0x..'|'pio:0x..')}."""
        out = {}
        for m in re.finditer(r"sent dev=([0-9a-f]{2}) q=(\d+) n=(\d+) at=(\S+)", self.serial.text()):
            out[(int(m.group(1), 16), int(m.group(2)))] = (int(m.group(3)), m.group(4))
        return out

    def finish(self, timeout=30):
        """Tell the guest (end=serial) to exit; returns QEMU's exit code
        (1 = guest success via isa-debug-exit, 3 = guest error)."""
        self.serial.send(b"q")
        return self.proc.wait(timeout)


class StorageDaemon:
    """qemu-storage-daemon exporting a null-co block device over vhost-user-blk."""

    def __init__(self, tb, name, num_queues):
        self.sock = tb.path("%s-vhost-user.sock" % name)
        argv = [require_binary("qemu-storage-daemon"),
                "--blockdev", "driver=null-co,node-name=%s,size=67108864" % name,
                "--export", "type=vhost-user-blk,id=exp-%s,node-name=%s,addr.type=unix,"
                            "addr.path=%s,num-queues=%d,writable=on" % (name, name, self.sock,
                                                                     num_queues)]
        self.proc = tb.spawn("qsd-" + name, argv)
        wait_until(lambda: os.path.exists(self.sock) or self._check_alive(), 15,
                   "qemu-storage-daemon socket %s" % self.sock)

    def _check_alive(self):
        if not self.proc.alive():
            raise Fatal("qemu-storage-daemon exited (rc %s):\n%s" % (
                self.proc.returncode(), self.proc.tail()))
        return False
