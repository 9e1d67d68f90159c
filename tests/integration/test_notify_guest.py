#!/usr/bin/env python3
"""The testbed itself, without vkickd: notify-guest brings legacy and modern
virtio-blk-pci (KVM), and vhost-user-blk-pci on qemu-storage-daemon (TCG), to
DRIVER_OK, sends exactly its plan, and its notify addresses agree with the
BARs QEMU reports over QMP (legacy: I/O BAR0 + 16; modern: the notify
capability inside a memory BAR, queue q at + q * multiplier)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, StorageDaemon, Skip, log, run_test, guest_elf)
from vkicktest.flows import kvm_blk_devices, plan_append


def bars(vm):
    """{slot: {bar index: (type, address)}} from QMP query-pci."""
    out = {}
    for bus in vm.qmp.execute("query-pci"):
        for d in bus["devices"]:
            out[d["slot"]] = {r["bar"]: (r["type"], r["address"]) for r in d.get("regions", [])}
    return out


def check(vm, plan, modes):
    vm.cont()
    out = vm.serial.wait_for("DONE", 180)
    log("guest output:\n" + out)
    sent = vm.guest_sent()
    b = bars(vm)
    for slot, counts in plan:
        for q, n in enumerate(counts):
            got_n, at = sent[(slot, q)]
            assert got_n == n, "slot %x q%d: guest sent %d, plan %d" % (slot, q, got_n, n)
            space, addr = at.split(":")
            addr = int(addr, 16)
            if modes[slot] == "legacy":
                assert space == "pio" and b[slot][0] == ("io", addr - 16), (at, b[slot])
            else:
                mem = [a for (t, a) in b[slot].values() if t == "memory"]
                assert space == "mmio" and any(a <= addr < a + 0x4000 for a in mem), (at, b[slot])
    assert "ERROR" not in out
    rc = vm.finish()
    assert rc == 1, "QEMU exit code %s (1 = guest success via isa-debug-exit)" % rc


def main():
    guest_elf()
    ran = []
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        with Testbed("guest-kvm") as tb:
            plan = [(0x4, [120, 70]), (0x5, [300, 100, 50])]
            vm = QemuVm(tb, "ng-kvm-%d" % os.getpid(), "kvm",
                        kvm_blk_devices([("legacy0", 4, "legacy", 2), ("modern0", 5, "modern", 3)]),
                        plan_append(plan, "end=serial"))
            check(vm, plan, {4: "legacy", 5: "modern"})
            ran.append("kvm")
    else:
        log("no usable /dev/kvm: KVM part not run")
    with Testbed("guest-tcg") as tb:
        qsd = StorageDaemon(tb, "vub", num_queues=2)
        plan = [(0x4, [40, 30])]
        vm = QemuVm(tb, "ng-tcg-%d" % os.getpid(), "tcg",
                    [("-chardev", "socket,id=vubc,path=%s" % qsd.sock),
                     ("-device", "vhost-user-blk-pci,id=vub0,chardev=vubc,num-queues=2,addr=0x4,"
                                 "disable-legacy=on")],
                    plan_append(plan, "end=serial"), shared_mem=True)
        check(vm, plan, {4: "modern"})
        ran.append("tcg-vhost-user")
    log("ran: %s" % ", ".join(ran))


if __name__ == "__main__":
    run_test(main)
