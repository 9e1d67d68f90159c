#!/usr/bin/env python3
"""Live migration of the VM testbed's guest (docs/operations.md section 6):
Debian's kernel under TCG with vkick-agent on virtio-serial and vkick-blk on
a vhost-user-blk disk, moved from one QEMU process to another on this host.

1. Source (scripts/vm-testbed.sh): vkickctl sets static B=4 for vkblk0; a
   vkick-blk run (--policy=adaptive: it follows the agent) gets that policy
   through the agent, acked on both queues, lease active. Paused (`stop`)
   for 8 s under I/O, longer than the 5 s lease: state "paused",
   vkick_vm_running 0, the lease still active, the generation unchanged,
   no lease expiry counted; `cont`, the run completes. Host counts H.
2. Destination: the source's command line (qemu.cmdline) with sockets,
   pidfile and serial log of its own, a second qemu-storage-daemon on the
   same disk image, -S -incoming unix:...; vkickd attaches it through a
   second --qmp and holds it (not a second VM) while inmigrate.
3. `migrate`; the destination takes over the `vm` label (new pid, counts
   still H: not reset, not doubled), `cont`; the guest's agent reconnects
   over the destination's own chardev by itself (vkick_agent_connected 1);
   a new vkick-blk run gets static B=4 again (acked, lease active) and the
   host counts grow from H by the driver's own notify writes (+0..2 per
   queue: QEMU's start kicks).
No -uuid in the testbed: the name decides (both uuids nil).
Skips (77) like the other VM tests when the host lacks what they need."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from vkicktest.util import Fatal
from vkicktest import Testbed, QmpClient, log, run_test, wait_until, require_binary
from vkicktest.vm import (TestbedVm, GuestShell, VM_NAME, VHOST_DEVICE as DEVICE,
                          VHOST_PCI as PCI, ensure_guest_image, guest_shell_script,
                          stable_counts, status_rows, require_vm_testbed, read_text)

PRELUDE = "vkick-agent --interval=200ms >/tmp/vkick-agent.log 2>&1 &"
PAUSE_S = 8  # `stop` this long (> --lease=5s) under I/O
MAX_STARTUP_KICKS = 2  # per queue, QEMU's own kick when it starts a vhost queue
DRIVER = ("vkick-blk --pci=%s --rw=randread --queues=2 --qd=8 --runtime=%d --policy=adaptive "
          "--json > /tmp/run%d.out 2>&1; echo rc=$? >> /tmp/run%d.out")


def set_policy(vkickctl, admin):
    r = subprocess.run([vkickctl, "--socket=" + admin, "policy", "set", "--vm", VM_NAME,
                        "--device", DEVICE, "static", "--batch", "4", "--defer-us", "50"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr


def drive_and_check_policy(sh, vkickctl, admin, n, runtime=12, while_running=None):
    """Runs vkick-blk in the guest (background) until the static policy is
    in force and acked on both queues with an active lease, then
    while_running(rows) if given; waits for the driver to end; returns (its
    JSON result, its per-queue notify writes)."""
    sh.check("(%s) </dev/null >/dev/null 2>&1 &" % (DRIVER % (PCI, runtime, n, n)))
    rows = []

    def in_force():
        nonlocal rows
        rows = status_rows(vkickctl, admin, DEVICE)
        return len(rows) == 2 and all(
            q["agent"] and q["mode"] == "static" and q["batch"] == 4 and q["lease"] == "active"
            and q["generation"] != 0 and q["acked_generation"] == q["generation"]
            and q["applied_batch"] == 4 for q in rows)
    wait_until(in_force, runtime + 20, "static B=4 acked with an active lease (run %d)" % n,
               interval=0.5)
    log("run %d: policy in force: %s" % (n, [(q["queue"], q["mode"], q["batch"], q["lease"],
                                              q["state"]) for q in rows]))
    if while_running:
        while_running(rows)
    out = ""

    def done():
        nonlocal out
        out = sh.check("cat /tmp/run%d.out" % n)
        return "rc=" in out
    wait_until(done, runtime + 60, "vkick-blk run %d" % n, interval=1)
    assert "rc=0" in out, out[-3000:]
    res = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    nm = re.search(r"vkick-blk: pci-notifies((?: q\d+=\d+)+)", out)
    assert nm, out[-2000:]
    return res, {int(q): int(c) for q, c in re.findall(r"q(\d+)=(\d+)", nm.group(1))}


def destination(tb, vm, mig_sock):
    """The source's QEMU command line with its own sockets, a second
    qemu-storage-daemon (same image, locking off: the source's holds the
    lock) and -incoming; returns (QEMU process, its dir, pid)."""
    d = tb.path("dst")
    os.makedirs(d, exist_ok=True)
    src = vm.vmdir
    qsd = require_binary("qemu-storage-daemon")
    vu = os.path.join(d, "vhost-user-blk.sock")
    tb.spawn("qsd-dst", [qsd, "--blockdev", "driver=file,node-name=vkblk0disk,filename=%s,"
                         "cache.direct=off,locking=off" % os.path.join(src, "vkblk0.img"),
                         "--export", "type=vhost-user-blk,id=vkblk0exp,node-name=vkblk0disk,"
                         "addr.type=unix,addr.path=%s,num-queues=2,writable=on" % vu])
    wait_until(lambda: os.path.exists(vu), 15, "destination qemu-storage-daemon socket")
    argv = shlex.split(read_text(os.path.join(src, "qemu.cmdline")))
    qmp_vkickd = tb.path("qmp-vkickd-dst.sock")
    repl = {tb.path("qmp-vkickd.sock"): qmp_vkickd}
    for f in ("qmp-ctl.sock", "qemu.pid", "agent.sock", "test.sock", "serial.log",
              "vhost-user-blk.sock"):
        repl[os.path.join(src, f)] = os.path.join(d, f)
    out = []
    for a in argv:
        for old, new in repl.items():
            a = a.replace(old, new)
        out.append(a)
    if "-S" not in out:
        out.append("-S")
    out += ["-incoming", "unix:" + mig_sock]
    proc = tb.spawn("qemu-dst", out)

    def up():
        if not proc.alive():
            raise Fatal("destination QEMU exited:\n" + proc.tail())
        return all(os.path.exists(os.path.join(d, f)) for f in ("qmp-ctl.sock", "qemu.pid"))
    wait_until(up, 60, "destination QEMU sockets")
    return proc, d, int(read_text(os.path.join(d, "qemu.pid")).strip())


def main():
    bdir, vkickctl = require_vm_testbed()
    ensure_guest_image(bdir)
    keys = {(DEVICE, q) for q in range(2)}
    figures = {}
    with Testbed("vm-migration") as tb:
        admin = tb.path("admin.sock")
        vm = TestbedVm(tb, bdir, guest_shell_script(PRELUDE), keys, timeout=900,
                       vkickd_extra=["--qmp=" + tb.path("qmp-vkickd-dst.sock"),
                                     "--control-interval=500ms", "--lease=5s",
                                     "--state-dir=" + tb.path("state"),
                                     "--admin-socket=" + admin])
        vk = vm.vk
        vm.wait_marker("=== VKICK-SHELL READY ===", 300)
        log(vm.boot_log())
        sh = GuestShell(tb, vm.path("test.sock"))
        set_policy(vkickctl, admin)

        def pause(rows):
            """`stop` for longer than the lease under I/O: the law and the
            lease hold (no new generation, no expiry), then `cont`."""
            expired = vk.metrics().value("vkick_queue_lease_expired_total", vm=VM_NAME,
                                         device=DEVICE, queue="0") or 0
            vm.ctl.execute("stop")
            wait_until(lambda: all(q["state"] == "paused" for q in
                                   status_rows(vkickctl, admin, DEVICE)), 10, "state paused")
            time.sleep(PAUSE_S)
            held = status_rows(vkickctl, admin, DEVICE)
            m = vk.metrics()
            figures["paused_rows"] = [(q["queue"], q["state"], q["lease"], q["batch"],
                                       q["generation"] == r["generation"])
                                      for q, r in zip(held, rows)]
            assert m.value("vkick_vm_running", vm=VM_NAME) == 0
            for q, r in zip(held, rows):
                assert q["state"] == "paused" and q["frozen"], q
                assert q["lease"] == "active" and q["generation"] == r["generation"] and \
                    q["batch"] == 4, "held while paused %ds: %r (before %r)" % (PAUSE_S, q, r)
            assert (m.value("vkick_queue_lease_expired_total", vm=VM_NAME, device=DEVICE,
                            queue="0") or 0) == expired, "a lease expired while paused"
            vm.ctl.execute("cont")
            vk.wait_metric("running again", lambda m: m.value("vkick_vm_running", vm=VM_NAME) == 1,
                           30)
        res1, notes1 = drive_and_check_policy(sh, vkickctl, admin, 1, runtime=25,
                                              while_running=pause)
        base = stable_counts(vk, keys)
        figures["source_counts"] = {q: int(base[(DEVICE, q)]) for q in range(2)}
        log("source pid %d: host counts %s, run 1 wrote %s" % (vm.qemu_pid, base, notes1))

        mig = tb.path("mig.sock")
        dproc, ddir, dpid = destination(tb, vm, mig)
        wait_until(lambda: "pid %d is migrating in" % dpid in vk.proc.output(), 60,
                   "vkickd holding the incoming VM")
        pids = [l["pid"] for l, v in vk.metrics().select("vkick_vm_info", vm=VM_NAME) if v == 1]
        assert pids == [str(vm.qemu_pid)], "held: not a second VM: %r" % pids
        t0 = time.monotonic()
        vm.ctl.execute("migrate", uri="unix:" + mig)
        info = {}

        def completed():
            nonlocal info
            info = vm.ctl.execute("query-migrate")
            if info.get("status") == "failed":
                raise Fatal("migration failed: %r" % info)
            return info.get("status") == "completed"
        wait_until(completed, 300, "migration", interval=0.2)
        figures["migrate_s"] = round(time.monotonic() - t0, 2)
        figures["qemu_total_ms"], figures["qemu_downtime_ms"] = info.get("total-time"), info.get("downtime")
        vk.wait_metric("destination takes over",
                       lambda m: m.value("vkick_vm_info", vm=VM_NAME, pid=str(dpid)) == 1, 60)
        figures["takeover_s"] = round(time.monotonic() - t0, 2)
        m = vk.metrics()
        pids = [l["pid"] for l, v in m.select("vkick_vm_info", vm=VM_NAME) if v == 1]
        assert pids == [str(dpid)], pids
        now = vk.queue_counts(m, VM_NAME)
        assert all(now[k] == base[k] for k in keys), "counts at takeover %r != source's %r" % (
            now, base)
        dctl = QmpClient(os.path.join(ddir, "qmp-ctl.sock"))
        tb.callback(dctl.close)
        dctl.execute("cont")
        t1 = time.monotonic()
        vk.wait_metric("agent reconnected over the destination's channel",
                       lambda m: m.value("vkick_agent_connected", vm=VM_NAME) == 1, 120)
        figures["agent_reconnect_s"] = round(time.monotonic() - t1, 2)
        dsh = GuestShell(tb, os.path.join(ddir, "test.sock"))
        res2, notes2 = drive_and_check_policy(dsh, vkickctl, admin, 2)
        after = stable_counts(vk, keys)
        for q in range(2):
            extra = after[(DEVICE, q)] - base[(DEVICE, q)] - notes2.get(q, 0)
            assert 0 <= extra <= MAX_STARTUP_KICKS, (
                "queue %d: source %d + destination run %d, metric %d" % (
                    q, base[(DEVICE, q)], notes2.get(q, 0), after[(DEVICE, q)]))
        figures["destination_run_notifies"] = notes2
        figures["after_counts"] = {q: int(after[(DEVICE, q)]) for q in range(2)}
        assert "migrated: pid %d" % dpid in vk.proc.output()
        dsh.run("kill $(pidof vkick-agent) 2>/dev/null; true")
        dsh.quit()
        dctl.execute("quit")
    log("figures: %s" % json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    run_test(main)
