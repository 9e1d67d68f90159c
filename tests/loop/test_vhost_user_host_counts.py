#!/usr/bin/env python3
"""Host-counted kicks of a --vhost-user driver, all real parts:
qemu-storage-daemon (vhost-user-blk, null-co) + vkickd with the eBPF probes
and --vhost-user=disk0=SOCKET + vkick-blk started AFTER vkickd.

vkick-blk sends its SET_VRING_KICK messages within milliseconds of starting,
before vkickd could discover it: the probes track it from its connect() to
the declared socket path (docs/probes.md, "vhost-user frontends"). Checks:

  * vkick_virtqueue_notifications_total{vm="vhost-user",device="disk0",
    queue="0"} exists at 0 as soon as vkickd runs (before any driver);
  * after a vkick-blk run it equals vkick-blk's own reported `kicks`
    exactly (every counted kick is one 8-byte write() to the kick eventfd;
    a write interrupted by a signal (EINTR) would be retried and traced
    twice, and vkick-blk installs no signal handlers: tolerance 0);
  * the frontend is dropped when it exits (no kick-fd bindings left), and a
    second run of the driver (a restart) continues the same counter;
  * the control loop uses the host count: vkickctl status shows
    host-derived notifications per request while the driver runs.

Needs root (eBPF) and qemu-storage-daemon; skips (77) otherwise.
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from vkicktest import (Testbed, Vkickd, log, run_test, wait_until, build_dir,  # noqa: E402
                       require_root, require_binary)


def binary(env, name):
    p = os.environ.get(env) or os.path.join(build_dir(), "bin", name)
    if not os.access(p, os.X_OK):
        raise AssertionError("%s not built at %s" % (name, p))
    return p


def host_count(vk):
    m = vk.metrics()
    return m.value("vkick_virtqueue_notifications_total", vm="vhost-user", device="disk0",
                   queue="0")


def bindings(vk):
    return vk.metrics().value("vkick_probe_kick_fd_bindings")


def main():
    require_root()
    qsd = require_binary("qemu-storage-daemon")
    blk_bin = binary("VKICK_BLK_BIN", "vkick-blk")

    with Testbed("vu-host-counts") as tb:
        sock = tb.path("disk0.sock")
        tb.spawn("qsd", [qsd, "--blockdev", "driver=null-co,node-name=n0,size=%d" % (1 << 30),
                         "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                         "addr.path=%s,num-queues=1" % sock])
        wait_until(lambda: os.path.exists(sock), 15, "qsd socket")
        vk = Vkickd(tb, [], extra=[
            "--agent-socket=" + tb.path("agent.sock"), "--vhost-user-kicks", "--vhost-user=disk0=" + sock,
            "--state-dir=" + tb.path("state"), "--admin-socket=" + tb.path("admin.sock"),
            "--control-interval=200ms", "--lease=3s"])
        # Declared: the series exists at 0 before any driver ran.
        vk.wait_metric("disk0 queue 0 series at 0", lambda m: m.value(
            "vkick_virtqueue_notifications_total", vm="vhost-user", device="disk0",
            queue="0") == 0, timeout=10)
        log("declared: notifications_total{device=disk0,queue=0} = 0 before any driver")

        total_driver = 0
        for run in (1, 2):
            blk = tb.spawn("blk%d" % run, [
                blk_bin, "--socket=" + sock, "--policy=static:8,50us", "--json",
                "--runtime=2", "--qd=16", "--run_dir=" + tb.path("run")])
            rc = blk.wait(60)
            assert rc == 0, "vkick-blk run %d rc %s:\n%s" % (run, rc, blk.tail())
            res = json.loads(blk.output().strip().splitlines()[-1])
            assert res["errors"] == 0 and res["kicks"] > 0, res
            total_driver += res["kicks"]
            # The counters are read at scrape time: no delay to wait out,
            # but allow a scrape or two.
            got = wait_until(lambda: (lambda c: c if c == total_driver else None)(host_count(vk)),
                             5, "host count == driver kicks (%d)" % total_driver, interval=0.2) \
                if host_count(vk) != total_driver else host_count(vk)
            log("run %d: vkick-blk kicks %d (requests %d, %.4f kicks/request); vkickd "
                "notifications_total %d (cumulative driver kicks %d)" % (
                    run, res["kicks"], res["requests"], res["kicks_per_request"], got,
                    total_driver))
            assert got == total_driver, (got, total_driver)
            # The frontend exited: dropped, its bindings swept.
            wait_until(lambda: bindings(vk) == 0, 5, "kick-fd bindings of the exited driver "
                       "swept", interval=0.2)
        m = vk.metrics()
        for reason in ("map_full", "read_user_failed", "bad_vhost_msg"):
            assert m.value("vkick_probe_errors_total", reason=reason) == 0, reason

        # The control loop believes the host count: with a driver running
        # (no agent here, so no samples) the status row shows the host rate.
        blk = tb.spawn("blk3", [blk_bin, "--socket=" + sock, "--policy=static:8,50us",
                                "--json", "--runtime=3", "--qd=16",
                                "--run_dir=" + tb.path("run")])
        ctl = binary("VKICKCTL_BIN", "vkickctl")

        def host_rate():
            r = subprocess.run([ctl, "--socket=" + tb.path("admin.sock"), "status", "--json"],
                               capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return None
            for q in json.loads(r.stdout)["queues"]:
                if q["device"] == "disk0" and q["queue"] == 0 and \
                        q.get("notifications_per_s", 0) > 0:
                    return q
            return None
        row = wait_until(host_rate, 10, "the control loop sees host-counted notifications/s",
                         interval=0.2)
        log("control loop: disk0 q0 notifications/s %.0f (host-counted)" %
            row["notifications_per_s"])
        assert blk.wait(60) == 0, blk.tail()
        time.sleep(0.1)


if __name__ == "__main__":
    run_test(main)
