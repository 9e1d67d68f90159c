#!/usr/bin/env python3
"""TCG + vhost-user-blk-pci on qemu-storage-daemon: every guest notify is an
eventfd write() by QEMU, labelled per queue by vkickd from QEMU's own
SET_VRING_KICK messages. Counts equal the plan plus QEMU's start-up kicks.

Start-up kicks: when the guest sets DRIVER_OK, QEMU starts vhost and kicks
each started queue itself (vhost_user_blk_start "kick right away", and once
more ~12 ms later): measured exactly 2 per queue with QEMU 7.2 in 5 runs
(ftrace syscalls:sys_enter_write, count == 8, on the kick fds, plans 0/0,
1/1, 3/0, 300/200), all before the guest's first notify. The guest parks at
READY until we send 'g', so the test takes the start-up count once it is
stable at READY and asserts both: 0 <= start-up <= 2 per queue, and
(count after the plan) - (start-up count) == plan exactly."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, StorageDaemon, Vkickd, log, run_test, require_root,
                       require_tracefs, guest_elf, vkickd_path)
from vkicktest.flows import plan_append, wait_counts

DEVICE, SLOT, QUEUES = "vub0", 0x4, 2
PLAN = [400, 250]
MAX_STARTUP_KICKS = 2


def stable_counts(vk, name, keys, settle=1.0, timeout=20):
    """Counts that did not change across two scrapes `settle` seconds apart."""
    deadline = time.monotonic() + timeout
    prev = None
    while time.monotonic() < deadline:
        c = {k: v for k, v in vk.queue_counts(vk.metrics(), name).items() if k in keys}
        if c == prev and set(c) == set(keys):
            return c
        prev = c
        time.sleep(settle)
    raise AssertionError("counts did not settle: %r" % prev)


def main():
    require_root()
    require_tracefs()
    guest_elf()
    vkickd_path()
    with Testbed("tcg-vub") as tb:
        name = "it-tcg-%d" % os.getpid()
        # The export offers at least the device's queues (else vhost fails).
        qsd = StorageDaemon(tb, "vub", num_queues=QUEUES)
        devices = [("-chardev", "socket,id=vubc,path=%s" % qsd.sock),
                   ("-device", "vhost-user-blk-pci,id=%s,chardev=vubc,num-queues=%d,addr=%#x,"
                               "disable-legacy=on" % (DEVICE, QUEUES, SLOT))]
        vm = QemuVm(tb, name, "tcg", devices,
                    plan_append([(SLOT, PLAN)], "go=serial end=serial"), shared_mem=True)
        vk = Vkickd(tb, [vm.qmp_vkickd])
        # vkickd learns kick fds from SET_VRING_KICK, sent when the guest sets
        # DRIVER_OK: it must be attached (and know the device) before `cont`.
        vk.wait_vm(name, vm.pid)
        keys = {(DEVICE, q) for q in range(QUEUES)}
        vk.wait_metric("series for %s queues" % DEVICE,
                       lambda m: keys <= set(vk.queue_counts(m, name)), 30)
        vm.cont()
        vm.serial.wait_for("READY", 60)
        startup = stable_counts(vk, name, keys)
        log("start-up kicks per queue (before any guest notify): %r" % sorted(startup.items()))
        for k, v in startup.items():
            assert 0 <= v <= MAX_STARTUP_KICKS, "start-up kicks %s = %g, want 0..%d" % (
                k, v, MAX_STARTUP_KICKS)

        vm.serial.send(b"g")
        vm.serial.wait_for("DONE", 120)
        sent = vm.guest_sent()
        assert [sent.get((SLOT, q), (None,))[0] for q in range(QUEUES)] == PLAN, sent

        expected = {(DEVICE, q): startup[(DEVICE, q)] + n for q, n in enumerate(PLAN)}
        got = wait_counts(vk, name, expected)
        log("vkickd per-queue counts: %r (plan %r)" % (sorted(got.items()), PLAN))
        for q, n in enumerate(PLAN):
            c = got.get((DEVICE, q))
            assert c is not None and n <= c <= n + MAX_STARTUP_KICKS, \
                "queue %d: count %r, want plan %d .. plan+%d" % (q, c, n, MAX_STARTUP_KICKS)
        assert got == expected, "guest-phase counts differ from the plan: want %r got %r" % (
            sorted(expected.items()), sorted(got.items()))

        unknown = {k: v for k, v in vk.queue_counts(vk.metrics(), name).items() if k not in keys}
        assert not unknown, "kicks attributed elsewhere (unknown fd/queue?): %r" % unknown

        rc = vm.finish()
        assert rc == 1, "QEMU exit code %s (1 = guest success via isa-debug-exit)" % rc


if __name__ == "__main__":
    run_test(main)
