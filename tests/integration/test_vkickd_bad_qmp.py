#!/usr/bin/env python3
"""vkickd with one good VM and three bad --qmp sockets (missing, accepts but
never answers, speaks garbage): it keeps serving and counting the good VM
exactly, vkick_qmp_errors_total rises for the bad ones (and stays 0 for the
good one), and when the good VM goes away (QEMU killed) its series are
dropped while vkickd keeps serving."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, Vkickd, log, run_test, require_root, require_kvm,
                       require_tracefs, guest_elf, vkickd_path, wait_until, http_get)
from vkicktest.flows import (FakeQmpServer, kvm_blk_devices, plan_append, sync_with_canary,
                             wait_counts)

PLAN = [("modern0", 0x4, "modern", 2, [600, 250])]
CANARY = ("canary0", 0x5, "modern", 1)


def qmp_errors(m):
    """{qmp label: total errors over all reasons}"""
    out = {}
    for labels, v in m.select("vkick_qmp_errors_total"):
        out[labels.get("qmp")] = out.get(labels.get("qmp"), 0) + v
    return out


def main():
    require_root()
    require_kvm()  # the good VM's notifies are counted through KVM tracepoints
    require_tracefs()
    guest_elf()
    vkickd_path()
    with Testbed("bad-qmp") as tb:
        name = "it-badqmp-%d" % os.getpid()
        missing = tb.path("missing-qmp.sock")  # never created
        silent = FakeQmpServer(tb, tb.path("silent-qmp.sock"), "silent")
        garbage = FakeQmpServer(tb, tb.path("garbage-qmp.sock"), "garbage")
        vm = QemuVm(tb, name, "kvm", kvm_blk_devices([p[:4] for p in PLAN] + [CANARY]),
                    plan_append([(p[1], p[4]) for p in PLAN],
                                "canary=%x go=serial end=serial" % CANARY[1]))
        vk = Vkickd(tb, [missing, silent.path, vm.qmp_vkickd, garbage.path],
                    extra=("--departed-retention=4s",))
        vk.wait_vm(name, vm.pid)

        bad = [missing, silent.path, garbage.path]
        errs1 = vk.wait_metric("vkick_qmp_errors_total > 0 for every bad socket",
                               lambda m: (lambda e: e if all(e.get(p, 0) > 0 for p in bad)
                                          else None)(qmp_errors(m)), 60)
        log("qmp errors: %r" % errs1)
        assert silent.accepted > 0 and garbage.accepted > 0, \
            "vkickd never connected to the fake sockets (silent %d, garbage %d)" % (
                silent.accepted, garbage.accepted)
        # Errors keep being counted (vkickd retries), and the good VM has none.
        vk.wait_metric("vkick_qmp_errors_total rising",
                       lambda m: sum(qmp_errors(m).get(p, 0) for p in bad) >
                       sum(errs1.get(p, 0) for p in bad), 30)

        vm.cont()
        vm.serial.wait_for("READY", 180)
        expected = {(qid, q): float(n) for qid, _, _, _, c in PLAN for q, n in enumerate(c)}
        vk.wait_metric("a series for every planned queue",
                       lambda m: set(expected) <= set(vk.queue_counts(m, name)), 30)
        sync_with_canary(vm, vk)
        vm.serial.send(b"g")
        vm.serial.wait_for("DONE", 300)
        got = wait_counts(vk, name, expected)
        assert got == expected, "good VM counts: want %r got %r" % (expected, got)
        m = vk.metrics()
        assert qmp_errors(m).get(vm.qmp_vkickd, 0) == 0, \
            "QMP errors counted for the good VM: %r" % qmp_errors(m)
        status, body = http_get(vk.url + "/healthz")
        assert status == 200 and body.strip() == "ok", (status, body)
        conn = {l.get("qmp"): v for l, v in m.select("vkick_qmp_connected")}
        # docs/metrics.md: vkick_qmp_connected{qmp} is 1 while a VM is attached.
        assert conn.get(vm.qmp_vkickd) == 1 and all(conn.get(p) == 0 for p in bad), \
            "vkick_qmp_connected: %r" % conn

        # The VM goes away abruptly: its final counts stay for the retention
        # (so a scrape in between misses nothing), then its series disappear.
        log("killing QEMU pid %d" % vm.pid)
        vm.proc.kill()
        vk.wait_metric("%s detached (vkick_qmp_connected 0)" % name,
                       lambda m: {l.get("qmp"): v for l, v in m.select("vkick_qmp_connected")}
                       .get(vm.qmp_vkickd) == 0, 10, interval=0.2)
        kept = vk.queue_counts(vk.metrics(), name)
        kept = {k: kept.get(k) for k in got}
        assert kept == got, "final counts kept after exit: want %r got %r" % (got, kept)

        def gone(m):
            left = [(n, l) for (n, l, _) in m.samples if l.get("vm") == name]
            return not left
        vk.wait_metric("all series of %s dropped" % name, gone, 30, interval=0.5)
        status, body = http_get(vk.url + "/healthz")
        assert status == 200 and body.strip() == "ok", (status, body)
        assert vk.proc.alive(), "vkickd died"


if __name__ == "__main__":
    run_test(main)
