"""Steps shared by the notify-guest tests."""

import socket
import threading
import time

from .util import log, wait_until


def kvm_blk_devices(specs):
    """QEMU args for virtio-blk-pci devices on null-co drives.
    specs: [(qdev_id, slot, "legacy"|"modern", num_queues)]"""
    out = []
    for qid, slot, mode, nq in specs:
        flag = "disable-modern=on" if mode == "legacy" else "disable-legacy=on"
        out.append(("-drive", "if=none,id=drv-%s,driver=null-co" % qid))
        out.append(("-device", "virtio-blk-pci,id=%s,addr=%#x,drive=drv-%s,%s,num-queues=%d"
                    % (qid, slot, qid, flag, nq)))
    return out


def plan_append(plan, extra=""):
    """plan: [(slot, [n0, n1, ...])] -> the guest's command line."""
    toks = ["dev=%x:%s" % (slot, ",".join(str(n) for n in counts)) for slot, counts in plan]
    return " ".join(toks + ([extra] if extra else []))


def sync_with_canary(vm, vk, device="canary0", timeout=90, margin=1.5):
    """Make sure vkickd has installed the VM's notify addresses before the
    guest writes its planned notifies, without spending any of them.

    The BARs (hence the notify addresses) only exist after the firmware ran,
    i.e. after `cont`, and vkickd learns them on its next QMP refresh. The
    guest (canary=SLOT, go=serial) sits at READY with every device at
    DRIVER_OK and, for each 'c' we send, writes ONE notify to a separate
    canary device's queue 0. Once vkickd counts a canary notify, a refresh
    after firmware BAR assignment has happened; all devices' BARs were
    assigned by then (the firmware did it before the guest started), so the
    planned counts can be exact. `margin` covers vkickd installing the
    devices of one refresh one after another."""
    deadline = time.monotonic() + timeout
    sent = 0
    while True:
        vm.serial.send(b"c")
        sent += 1
        wait_until(lambda: vm.serial.count("CANARY\n") >= sent, 30, "guest canary ack %d" % sent)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            c = vk.metrics().value("vkick_virtqueue_notifications_total",
                                   vm=vm.name, device=device, queue="0")
            if c and c > 0:
                log("canary counted by vkickd after %d canary notifies (count %g)" % (sent, c))
                time.sleep(margin)
                return sent
            time.sleep(0.2)
        if time.monotonic() > deadline:
            raise AssertionError("vkickd never counted a canary notify for %s/%s within %ds "
                                 "(%d sent): notify addresses not discovered?"
                                 % (vm.name, device, timeout, sent))


def wait_counts(vk, vm_name, expected, timeout=20):
    """Wait until the VM's per-queue counts for the expected devices equal
    `expected` ({(device, queue): n}); returns the last counts either way."""
    devices = {d for d, _ in expected}
    last = {}

    def done():
        nonlocal last
        c = vk.queue_counts(vk.metrics(), vm_name)
        last = {k: v for k, v in c.items() if k[0] in devices}
        return last == expected
    try:
        wait_until(done, timeout, "per-queue counts == plan", interval=0.5)
    except AssertionError:
        pass
    return last


class FakeQmpServer:
    """A unix socket that is not a working QMP monitor.
    mode 'silent': accepts and never says anything.
    mode 'garbage': accepts and answers everything with non-QMP bytes."""

    def __init__(self, tb, path, mode):
        self.path, self.mode = path, mode
        self.conns = []
        self.accepted = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.5)  # so close() ends the accept loop
        self._stop = False
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()
        tb.callback(self.close)

    def _serve(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            if self.mode == "garbage":
                threading.Thread(target=self._garbage, args=(c,), daemon=True).start()

    def _garbage(self, c):
        try:
            c.sendall(b"\x00\xffthis is not QMP {{{\n{\"QMP\": 42, \"oops\n")
            while not self._stop:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(b"}}} garbage \xfe\xfd\n[1,2,\n")
        except OSError:
            return

    def close(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
