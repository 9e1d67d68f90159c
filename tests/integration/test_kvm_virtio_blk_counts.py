#!/usr/bin/env python3
"""QEMU + KVM + virtio-blk-pci: vkickd's per-queue notification counts equal
exactly what notify-guest wrote, for a legacy (PIO, value = queue index) and
a modern (MMIO, one address per queue) device, and nothing lands on a wrong
queue (every queue has a different count, and every series is checked)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, Vkickd, log, run_test, require_root, require_kvm,
                       require_tracefs, guest_elf, vkickd_path)
from vkicktest.flows import kvm_blk_devices, plan_append, sync_with_canary, wait_counts

# (qdev id, PCI slot, interface, queues, planned notifies per queue)
PLAN = [("legacy0", 0x4, "legacy", 2, [1200, 700]),
        ("modern0", 0x5, "modern", 3, [3000, 1000, 500])]
CANARY = ("canary0", 0x6, "modern", 1)


def main():
    require_root()
    require_kvm()
    require_tracefs()
    guest_elf()
    vkickd_path()
    with Testbed("kvm-blk") as tb:
        name = "it-kvm-%d" % os.getpid()
        devices = kvm_blk_devices([p[:4] for p in PLAN] + [CANARY])
        append = plan_append([(p[1], p[4]) for p in PLAN],
                             "canary=%x go=serial end=serial" % CANARY[1])
        vm = QemuVm(tb, name, "kvm", devices, append)
        vk = Vkickd(tb, [vm.qmp_vkickd])
        vk.wait_vm(name, vm.pid)
        vm.cont()
        vm.serial.wait_for("READY", 180)
        log("guest at READY:\n" + vm.serial.text())

        expected = {(qid, q): float(n) for qid, _, _, _, counts in PLAN
                    for q, n in enumerate(counts)}
        # Every discovered queue has a series (at 0) before any notify.
        vk.wait_metric("a series for every planned queue",
                       lambda m: set(expected) <= set(vk.queue_counts(m, name)), 30)
        sync_with_canary(vm, vk)
        before = {k: v for k, v in vk.queue_counts(vk.metrics(), name).items()
                  if k in expected}
        # The guest's setup writes (legacy registers, modern common config)
        # are I/O writes too: none of them may count as a notification.
        assert all(v == 0 for v in before.values()), "counts before any notify: %r" % before

        vm.serial.send(b"g")
        vm.serial.wait_for("DONE", 300)
        sent = vm.guest_sent()
        for qid, slot, _, _, counts in PLAN:
            for q, n in enumerate(counts):
                assert sent.get((slot, q), (None,))[0] == n, "guest did not send the plan: %r" % sent

        got = wait_counts(vk, name, expected)
        log("vkickd per-queue counts: %r" % sorted(got.items()))
        assert got == expected, "per-queue counts differ from the plan:\n  want %r\n  got  %r" % (
            sorted(expected.items()), sorted(got.items()))
        m = vk.metrics()
        all_series = vk.queue_counts(m, name)
        extra = {k: v for k, v in all_series.items()
                 if k not in expected and k[0] != CANARY[0]}
        # Includes vkickd's {device|queue="unknown"} catch-alls: a kick it
        # could not attribute to a discovered queue would show up there.
        assert not extra, "series for devices/queues that do not exist: %r" % extra
        # Writes that match no notify address are counted, not dropped: the
        # guest's serial output and PCI config accesses are PIO writes.
        unmatched_pio = m.value("vkick_vm_unmatched_io_writes_total", vm=name, space="pio")
        assert unmatched_pio is not None and unmatched_pio > 0, \
            "vkick_vm_unmatched_io_writes_total{space=pio} = %r" % unmatched_pio
        log("unmatched pio=%s mmio=%s" % (
            unmatched_pio, m.value("vkick_vm_unmatched_io_writes_total", vm=name, space="mmio")))

        rc = vm.finish()
        assert rc == 1, "QEMU exit code %s (1 = guest success via isa-debug-exit)" % rc


if __name__ == "__main__":
    run_test(main)
