#!/usr/bin/env python3
"""A VM that moves to another QEMU process stays one VM (docs/operations.md
section 6), with exact host counts: notify-guest under KVM, whose canary
queue takes exactly one notify per 'c' byte on its serial port.

1. Source QEMU (-uuid U) runs; vkickd counts N canary notifies; an operator
   sets a static policy for the VM with vkickctl.
2. Destination QEMU (same -name and -uuid, -incoming unix:..., -S): held
   (no second VM in the metrics) while inmigrate. `migrate` completes; the
   destination takes over the `vm` label with the count still N (not 0, not
   2N), paused (vkick_vm_running 0, status state "paused"); `cont`; M more
   notifies: the series reads exactly N + M; the policy is still in force;
   the source quits: nothing changes.
3. Save to a file (migrate "exec:cat > FILE"), quit, restore in a third
   QEMU (-incoming "exec:cat FILE"): it takes over from the departed copy,
   L more notifies: N + M + L.
Skips (77) without root, /dev/kvm, tracefs kvm events or QEMU."""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest.util import Fatal
from vkicktest import (Testbed, QemuVm, Vkickd, log, run_test, guest_elf, wait_until,
                       require_root, require_kvm, require_tracefs, require_binary, build_dir)
from vkicktest.flows import kvm_blk_devices, plan_append, sync_with_canary

NAME = "ng-mig-%d" % os.getpid()
UUID = "6c1e9d8a-1f0b-4e5c-9a1d-%012x" % os.getpid()
DEVICES = kvm_blk_devices([("modern0", 5, "modern", 2), ("canary0", 6, "modern", 1)])
APPEND = plan_append([(0x5, [10, 5])], "canary=6 go=serial end=serial")
M_DST, L_RST, N_EXTRA = 70, 30, 40


def canary_count(vk):
    v = vk.metrics().value("vkick_virtqueue_notifications_total", vm=NAME, device="canary0",
                           queue="0")
    return int(v) if v is not None else None


def settled_count(vk, settle=1.5, timeout=30):
    """The canary count once two scrapes `settle` s apart agree."""
    prev = None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        c = canary_count(vk)
        if c is not None and c == prev:
            return c
        prev = c
        time.sleep(settle)
    raise AssertionError("canary count did not settle: %r" % prev)


def canaries(vm, n):
    """Exactly n canary notifies from the guest in `vm` (acked on its serial)."""
    before = vm.serial.count("CANARY\n")
    vm.serial.send(b"c" * n)
    wait_until(lambda: vm.serial.count("CANARY\n") >= before + n, 120,
               "%d canary acks from %s" % (n, vm.proc.name))


def migrate(vm, uri):
    """Runs `migrate` to uri; returns query-migrate's final answer."""
    t0 = time.monotonic()
    vm.qmp.execute("migrate", uri=uri)
    res = {}

    def done():
        nonlocal res
        res = vm.qmp.execute("query-migrate")
        if res.get("status") == "failed":
            raise Fatal("migration to %s failed: %r" % (uri, res))
        return res.get("status") == "completed"
    wait_until(done, 120, "migration to %s" % uri, interval=0.05)
    log("migrate %s: completed in %.2fs (QEMU: total %s ms, downtime %s ms)" % (
        uri, time.monotonic() - t0, res.get("total-time"), res.get("downtime")))
    return res


def vm_pids(vk):
    return sorted(l["pid"] for l, v in vk.metrics().select("vkick_vm_info", vm=NAME) if v == 1)


def status(vkickctl, admin):
    r = subprocess.run([vkickctl, "--socket=%s" % admin, "status", "--json"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return [q for q in json.loads(r.stdout)["queues"] if q["vm"] == NAME]


def check_policy(vkickctl, admin, state):
    rows = status(vkickctl, admin)
    assert rows, "no status rows for %s" % NAME
    for q in rows:
        assert (q["mode"], q["source"], q["batch"]) == ("static", "vm", 4), q
        assert q["state"] == state, (q, state)


def main():
    require_root()
    require_kvm()
    require_tracefs()
    require_binary("qemu-system-x86_64")
    guest_elf()
    vkickctl = os.path.join(os.path.abspath(build_dir()), "bin", "vkickctl")
    assert os.access(vkickctl, os.X_OK), "vkickctl not built (target 'vkickctl')"
    figures = {}
    with Testbed("migration") as tb:
        def qemu(tag, extra=()):
            return QemuVm(tb, NAME, "kvm", DEVICES, APPEND, tag=tag,
                          extra=["-uuid", UUID] + list(extra))
        admin = tb.path("admin.sock")
        src = qemu("src")
        qmps = [src.qmp_vkickd, tb.path("dst-qmp-vkickd.sock"), tb.path("rst-qmp-vkickd.sock")]
        vk = Vkickd(tb, qmps, refresh="1s",
                    extra=["--admin-socket=" + admin, "--state-dir=" + tb.path("state"),
                           "--departed-retention=300s"])
        vk.wait_vm(NAME, src.pid, timeout=60)
        src.cont()
        src.serial.wait_for("READY", 300)
        sync_with_canary(src, vk, device="canary0")
        canaries(src, N_EXTRA)
        n = settled_count(vk)
        figures["source"] = n
        log("source pid %d: vkickd counted N = %d canary notifies" % (src.pid, n))
        r = subprocess.run([vkickctl, "--socket=" + admin, "policy", "set", "--vm", NAME,
                            "static", "--batch", "4", "--defer-us", "50"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: all(q["mode"] == "static" for q in status(vkickctl, admin)), 10,
                   "static policy in force")
        check_policy(vkickctl, admin, "running")

        # ---- live migration
        mig = tb.path("mig.sock")
        dst = qemu("dst", ["-incoming", "unix:" + mig])
        wait_until(lambda: "'%s' pid %d is migrating in" % (NAME, dst.pid) in vk.proc.output(),
                   30, "vkickd holding the incoming VM")
        assert vm_pids(vk) == [str(src.pid)], "held: not a second VM (%r)" % vm_pids(vk)
        t0 = time.monotonic()
        res = migrate(src, "unix:" + mig)
        figures["live_total_ms"], figures["live_downtime_ms"] = res.get("total-time"), res.get("downtime")
        vk.wait_metric("destination takes over",
                       lambda m: m.value("vkick_vm_info", vm=NAME, pid=str(dst.pid)) == 1, 30)
        figures["takeover_s"] = round(time.monotonic() - t0, 2)
        assert vm_pids(vk) == [str(dst.pid)], vm_pids(vk)
        after = canary_count(vk)
        assert after == n, "taken over with %s, source counted %d (reset or double?)" % (after, n)
        assert vk.metrics().value("vkick_vm_running", vm=NAME) == 0, "-S: paused"
        check_policy(vkickctl, admin, "paused")
        dst.cont()
        vk.wait_metric("destination running", lambda m: m.value("vkick_vm_running", vm=NAME) == 1, 30)
        canaries(dst, M_DST)
        total = settled_count(vk)
        figures["destination"] = M_DST
        figures["after_live"] = total
        log("destination pid %d: +%d notifies; metric %d (N + M = %d)" % (
            dst.pid, M_DST, total, n + M_DST))
        assert total == n + M_DST, "metric %d != N + M = %d" % (total, n + M_DST)
        check_policy(vkickctl, admin, "running")
        assert "migrated: pid %d" % dst.pid in vk.proc.output()
        src.qmp.execute("quit")
        src.proc.wait(30)
        time.sleep(2.5)  # two refreshes: the source's departure must change nothing
        assert canary_count(vk) == n + M_DST and vm_pids(vk) == [str(dst.pid)], (
            canary_count(vk), vm_pids(vk))

        # ---- save to a file, restore in a new QEMU
        state_file = tb.path("vm.state")
        res = migrate(dst, "exec:cat > " + state_file)
        figures["save_total_ms"] = res.get("total-time")
        vk.wait_metric("saved VM not running",
                       lambda m: m.value("vkick_vm_running", vm=NAME) == 0, 30)
        wait_until(lambda: all(q["state"] == "postmigrate" for q in status(vkickctl, admin)), 10,
                   "status state postmigrate")
        dst.qmp.execute("quit")
        dst.proc.wait(30)
        rst = qemu("rst", ["-incoming", "exec:cat " + state_file])
        t0 = time.monotonic()
        vk.wait_metric("restored VM takes over",
                       lambda m: m.value("vkick_vm_info", vm=NAME, pid=str(rst.pid)) == 1, 60)
        figures["restore_takeover_s"] = round(time.monotonic() - t0, 2)
        assert vm_pids(vk) == [str(rst.pid)], "the departed copy became its base: %r" % vm_pids(vk)
        assert canary_count(vk) == n + M_DST, (canary_count(vk), n + M_DST)
        rst.cont()
        vk.wait_metric("restored VM running", lambda m: m.value("vkick_vm_running", vm=NAME) == 1, 30)
        canaries(rst, L_RST)
        total = settled_count(vk)
        figures["restored"] = L_RST
        figures["after_restore"] = total
        assert total == n + M_DST + L_RST, "metric %d != N + M + L = %d" % (total, n + M_DST + L_RST)
        check_policy(vkickctl, admin, "running")
        rst.qmp.execute("quit")
    log("figures: %s" % json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    run_test(main)
