#!/usr/bin/env python3
"""A real Prometheus server scrapes vkickd while a real QEMU+KVM guest writes
a known number of notifies per queue. Prometheus's HTTP API must give back
what the workload did:

  * the stored counter's increase over the burst equals the plan exactly
    (`x - x @ t0`);
  * `rate(vkick_virtqueue_notifications_total[W])` times W equals the plan
    within Prometheus's documented extrapolation to the window edges
    (at most one scrape interval at each end);
  * vkick's shipped recording rules load and evaluate (the per-queue rate
    rule is non-zero for the busy queues and absent for queues that do not
    exist); every shipped rule group is healthy.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, QemuVm, Vkickd, log, run_test, require_root, require_kvm,
                       require_tracefs, guest_elf, vkickd_path)
from vkicktest.flows import kvm_blk_devices, plan_append, sync_with_canary, wait_counts
from vkicktest.prometheus import Prometheus, prometheus_binary

PLAN = [("modern0", 0x4, "modern", 2, [2400, 800])]
CANARY = ("canary0", 0x6, "modern", 1)
SCRAPE_S = 1.0


def main():
    require_root()
    require_kvm()
    require_tracefs()
    prometheus_binary()
    guest_elf()
    vkickd_path()
    with Testbed("prom-e2e") as tb:
        name = "it-prom-%d" % os.getpid()
        devices = kvm_blk_devices([p[:4] for p in PLAN] + [CANARY])
        append = plan_append([(p[1], p[4]) for p in PLAN],
                             "canary=%x go=serial end=serial" % CANARY[1])
        vm = QemuVm(tb, name, "kvm", devices, append)
        vk = Vkickd(tb, [vm.qmp_vkickd])
        prom = Prometheus(tb, ["127.0.0.1:%d" % vk.port], scrape_interval="%ds" % SCRAPE_S)
        vk.wait_vm(name, vm.pid)
        vm.cont()
        vm.serial.wait_for("READY", 180)
        sync_with_canary(vm, vk)

        sel = 'vkick_virtqueue_notifications_total{vm="%s",device="modern0"}' % name
        # Prometheus must have stored the counters at their pre-burst value.
        wait_until_stored = time.time() + 30
        while not prom.query(sel):
            assert time.time() < wait_until_stored, "prometheus never stored %s" % sel
            time.sleep(0.5)
        time.sleep(2 * SCRAPE_S)
        t0 = time.time()
        vm.serial.send(b"g")
        vm.serial.wait_for("DONE", 300)
        expected = {("modern0", q): float(n) for q, n in enumerate(PLAN[0][4])}
        got = wait_counts(vk, name, expected)
        assert got == expected, "vkickd itself disagrees with the plan: %r vs %r" % (got, expected)
        time.sleep(3 * SCRAPE_S)  # let Prometheus scrape the final values
        t1 = time.time()

        # 1. Exact: what Prometheus stored grew by exactly the plan.
        inc = {int(l["queue"]): v for l, v in
               prom.query("%s - %s @ %.3f" % (sel, sel, t0 - SCRAPE_S), time=t1)}
        log("prometheus increase per queue:", inc)
        assert inc == {q: float(n) for q, n in enumerate(PLAN[0][4])}, \
            "stored increase %r != plan %r" % (inc, PLAN[0][4])

        # 2. rate() over a window that holds the whole burst.
        window = int(t1 - t0 + 2 * SCRAPE_S) + 1
        rates = {int(l["queue"]): v for l, v in
                 prom.query("rate(%s[%ds])" % (sel, window), time=t1)}
        log("prometheus rate[%ds] per queue:" % window, rates)
        # Prometheus extrapolates the increase seen between the window's first
        # and last samples to the window edges, by at most ~1 interval each.
        lo_factor = 1.0
        hi_factor = window / (window - 2.2 * SCRAPE_S)
        for q, n in enumerate(PLAN[0][4]):
            est = rates.get(q, 0.0) * window
            assert n * lo_factor * 0.999 <= est <= n * hi_factor, \
                "queue %d: rate*W = %.1f, plan %d (allowed %.1f..%.1f)" % (
                    q, est, n, n * lo_factor, n * hi_factor)

        # 3. The shipped rules: healthy, and the per-queue rate rule answers.
        groups = prom.api("rules")["groups"]
        assert groups, "no rule groups loaded"
        for g in groups:
            for r in g["rules"]:
                assert r.get("health") in ("ok", "unknown"), "rule %s: %r" % (r["name"], r)
        rec = 'vkick:virtqueue_notifications:rate1m{vm="%s"}' % name
        deadline = time.time() + 20
        while True:
            rr = {(l["device"], l["queue"]): v for l, v in prom.query(rec)}
            if all(rr.get(("modern0", str(q)), 0) > 0 for q in range(2)):
                break
            assert time.time() < deadline, "recording rule %s never answered: %r" % (rec, rr)
            time.sleep(1)
        log("recording rule %s: %r" % (rec, rr))
        assert ("modern0", "2") not in rr, "a series for a queue that does not exist: %r" % rr
        # Queue 0 got 3x the notifies of queue 1 in the same burst.
        ratio = rr[("modern0", "0")] / rr[("modern0", "1")]
        assert 2.9 < ratio < 3.1, "rate ratio q0/q1 = %.3f, plan 3.0" % ratio
        up = prom.query('up{job="vkickd"}')
        assert up and up[0][1] == 1.0, "up{job=vkickd} = %r" % up

        rc = vm.finish()
        assert rc == 1, "QEMU exit code %s (1 = guest success via isa-debug-exit)" % rc


if __name__ == "__main__":
    run_test(main)
