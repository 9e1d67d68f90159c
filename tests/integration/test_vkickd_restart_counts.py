#!/usr/bin/env python3
"""Nothing lost across a vkickd restart (--pin-dir): a real KVM guest
notifies while vkickd runs, while it is dead (kill -9) and while it is
stopped cleanly (SIGTERM), and every restarted vkickd on the same pin dir
shows exactly all of them in vkick_virtqueue_notifications_total: the
pinned kvm links kept counting, and the VM got its old vm_id and counter
slots back. One restart switches to the classic tracepoints (the pinned
links are replaced) and the last stop leaves those classic (perf) links
counting alone. At the end rm -r of the pin dir detaches every link.

kvm_exit does not fire on this paravirtual KVM (docs/probes.md), so the
exit counters are checked by the bpf test (host_probes_pin_test) only."""

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, Vkickd, log, run_test, require_root, require_kvm,
                       require_tracefs, guest_elf, vkickd_path, skip, wait_until)
from vkicktest.flows import kvm_blk_devices, plan_append, sync_with_canary

PLAN = [("legacy0", 0x4, "legacy", 2, [120, 70]),
        ("modern0", 0x5, "modern", 2, [300, 200])]
CANARY = ("canary0", 0x6, "modern", 1)
N_UP, N_KILLED, N_STOPPED = 40, 30, 20


def require_bpffs():
    with open("/proc/mounts") as f:
        if not any(l.split()[1:3] == ["/sys/fs/bpf", "bpf"] for l in f):
            skip("no bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")


def canaries(vm, n):
    """n canary notifies, each acknowledged by the guest (so all written)."""
    have = vm.serial.count("CANARY\n")
    for i in range(n):
        vm.serial.send(b"c")
        wait_until(lambda: vm.serial.count("CANARY\n") >= have + i + 1, 30, "canary ack")


def counts(vk, name):
    return {k: v for k, v in vk.queue_counts(vk.metrics(), name).items()
            if k[0] in {p[0] for p in PLAN} | {CANARY[0]}}


def expect_exactly(vk, name, want, what):
    """The counts reach `want` and stay there (a second copy of a link
    would overshoot)."""
    try:
        wait_until(lambda: counts(vk, name) == want, 30, what, interval=0.5)
    except AssertionError:
        raise AssertionError("%s:\n  want %r\n  got  %r\nvkickd log:\n%s" % (
            what, sorted(want.items()), sorted(counts(vk, name).items()), vk.proc.tail()))
    time.sleep(1.5)
    got = counts(vk, name)
    assert got == want, "%s, 1.5 s later:\n  want %r\n  got  %r" % (what, sorted(want.items()),
                                                                     sorted(got.items()))
    log("%s: %r" % (what, sorted(got.items())))


def with_canary(counts, n):
    out = dict(counts)
    out[(CANARY[0], 0)] = float(n)
    return out


def pinned_link_ids(pin):
    ids = []
    for name in sorted(os.listdir(os.path.join(pin, "links"))):
        out = subprocess.run(["bpftool", "-j", "link", "show", "pinned",
                              os.path.join(pin, "links", name)],
                             capture_output=True, text=True, check=True).stdout
        ids.append(json.loads(out)["id"])
    return ids


def link_exists(link_id):
    return subprocess.run(["bpftool", "link", "show", "id", str(link_id)],
                          capture_output=True).returncode == 0


def main():
    require_root()
    require_kvm()
    require_tracefs()
    require_bpffs()
    if not shutil.which("bpftool"):
        skip("bpftool not found (Debian package bpftool)")
    guest_elf()
    vkickd_path()
    pin = "/sys/fs/bpf/vkick-it-restart-%d" % os.getpid()
    with Testbed("restart") as tb:
        tb.callback(shutil.rmtree, pin, True)
        name = "it-restart-%d" % os.getpid()
        devices = kvm_blk_devices([p[:4] for p in PLAN] + [CANARY])
        append = plan_append([(p[1], p[4]) for p in PLAN],
                             "canary=%x go=serial end=serial" % CANARY[1])
        vm = QemuVm(tb, name, "kvm", devices, append)

        def start(flavour):
            vk = Vkickd(tb, [vm.qmp_vkickd], extra=["--pin-dir=" + pin,
                                                    "--kvm-tracepoints=" + flavour])
            vk.wait_vm(name, vm.pid)
            return vk

        vk = start("auto")
        vm.cont()
        vm.serial.wait_for("READY", 180)
        zero = {(qid, q): 0.0 for qid, _, _, _, c in PLAN for q in range(len(c))}
        sent = sync_with_canary(vm, vk)
        canaries(vm, N_UP)
        sent += N_UP
        expect_exactly(vk, name, with_canary(zero, sent),
                       "%d canaries while vkickd runs" % sent)

        # 1. kill -9: the pinned links count on.
        vk.proc.kill()
        canaries(vm, N_KILLED)
        sent += N_KILLED
        vk = start("auto")
        expect_exactly(vk, name, with_canary(zero, sent),
                       "after kill -9 + %d canaries while down, restarted" % N_KILLED)

        # 2. A clean stop (systemctl restart) keeps the VMs too; the next
        # vkickd loads the classic programs: the pinned links are replaced.
        vk.proc.stop()
        assert vk.proc.returncode() == 0, "vkickd exit code %s" % vk.proc.returncode()
        canaries(vm, N_STOPPED)
        sent += N_STOPPED
        vk = start("classic")
        assert "detached pinned link btf_kvm_mmio" in vk.proc.output() or \
            "replaced pinned link" in vk.proc.output(), vk.proc.tail()
        expect_exactly(vk, name, with_canary(zero, sent),
                       "after SIGTERM + %d canaries while down, restarted classic" % N_STOPPED)

        # 3. A clean stop of the classic vkickd (its pinned perf links must
        # stay enabled): the whole plan is sent while it is down.
        vk.proc.stop()
        vm.serial.send(b"g")
        vm.serial.wait_for("DONE", 300)
        guest = vm.guest_sent()
        want = {(CANARY[0], 0): float(sent)}
        for qid, slot, _, _, c in PLAN:
            for q, n in enumerate(c):
                assert guest.get((slot, q), (None,))[0] == n, "guest did not send the plan: %r" % guest
                want[(qid, q)] = float(n)
        vk = start("classic")
        assert "reused the pinned maps" in vk.proc.output(), vk.proc.tail()
        expect_exactly(vk, name, want, "after SIGTERM + the plan sent while down, restarted classic")

        # 4. Removal for good: stop vkickd, rm -r the pin dir: no link stays.
        ids = pinned_link_ids(pin)
        # kvm_exit, kvm_mmio, kvm_fast_mmio, kvm_pio, kvm_msi_set_irq
        assert len(ids) == 5, "pinned links: %r" % ids
        vk.proc.stop()
        assert all(link_exists(i) for i in ids), "links pinned after a clean stop"
        shutil.rmtree(pin)
        wait_until(lambda: not any(link_exists(i) for i in ids), 5, "links gone after rm -r")
        log("rm -r %s: links %r gone" % (pin, ids))
        rc = vm.finish()
        assert rc == 1, "QEMU exit code %s (1 = guest success via isa-debug-exit)" % rc


if __name__ == "__main__":
    run_test(main)
