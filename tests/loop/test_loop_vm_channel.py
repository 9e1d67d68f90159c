#!/usr/bin/env python3
"""The VM side of the agent channel with a real QEMU (TCG, paused: no guest
needed): -device virtserialport,name=org.vkick.agent.0 on a unix chardev
server. vkickd must find the port over QMP (its own -qmp socket) and
connect to the chardev as a client (QEMU's own query-chardev, on a second
QMP socket, shows the chardev connected); the VM's queues are in the loop
(status, policy metrics) with the agent down (no guest agent runs), a
policy set on the VM applies to them, and when QEMU goes away its queues and
series go too.
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from vkicktest import (Testbed, Vkickd, QmpClient, log, run_test, wait_until, build_dir,  # noqa: E402
                       require_binary)


def main():
    qemu = require_binary("qemu-system-x86_64")
    ctl_bin = os.path.join(build_dir(), "bin", "vkickctl")
    with Testbed("vmchan") as tb:
        agent_sock = tb.path("agent.sock")
        q = tb.spawn("qemu", [
            qemu, "-name", "vstest", "-S", "-accel", "tcg", "-display", "none", "-nodefaults",
            "-qmp", "unix:%s,server=on,wait=off" % tb.path("qmp-vkickd.sock"),
            "-qmp", "unix:%s,server=on,wait=off" % tb.path("qmp-test.sock"),
            "-chardev", "socket,id=vkickagent0,path=%s,server=on,wait=off" % agent_sock,
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,chardev=vkickagent0,name=org.vkick.agent.0",
            "-drive", "if=none,id=d0,driver=null-co",
            "-device", "virtio-blk-pci,id=disk0,drive=d0,num-queues=2"])
        wait_until(lambda: os.path.exists(tb.path("qmp-test.sock")), 15, "QEMU QMP socket")
        test_qmp = QmpClient(tb.path("qmp-test.sock"))

        def chardev_filename():
            for c in test_qmp.execute("query-chardev"):
                if c["label"] == "vkickagent0":
                    return c["filename"]
            return None

        assert chardev_filename().startswith("disconnected:"), chardev_filename()
        admin = tb.path("admin.sock")
        vk = Vkickd(tb, [tb.path("qmp-vkickd.sock")], extra=[
            "--no-probes", "--admin-socket=" + admin, "--state-dir=" + tb.path("state"),
            "--control-interval=200ms", "--lease=2s"])
        wait_until(lambda: chardev_filename() == "unix:%s,server=on" % agent_sock, 15,
                   "vkickd connected to the VM's agent chardev")
        wait_until(lambda: "connected for VM 'vstest'" in vk.proc.output(), 5,
                   "vkickd logs the VM agent channel")

        def status():
            r = subprocess.run([ctl_bin, "--socket=" + admin, "status", "--json"],
                               capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        rows = wait_until(lambda: [r for r in status()["queues"] if r["vm"] == "vstest"
                                   and r["device"] == "disk0"] or None, 10, "vstest queues")
        assert sorted(r["queue"] for r in rows) == [0, 1], rows
        assert not any(r["agent"] for r in rows), "no guest agent runs: agent down"
        r = subprocess.run([ctl_bin, "--socket=" + admin, "policy", "set", "--vm", "vstest",
                            "static", "--batch", "4", "--defer-us", "100"],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: vk.metrics().value(
            "vkick_queue_policy_info", vm="vstest", device="disk0", queue="1", mode="static",
            source="vm") == 1, 5, "static policy on the VM's queues")
        assert vk.metrics().value("vkick_agent_connected", vm="vstest") == 0

        # QEMU goes away: its queues and series go.
        q.kill()
        wait_until(lambda: not [r for r in status()["queues"] if r["vm"] == "vstest"], 15,
                   "vstest queues removed")
        m = vk.metrics()
        assert not m.select("vkick_queue_policy_info", vm="vstest")
        assert not m.select("vkick_agent_connected", vm="vstest")


if __name__ == "__main__":
    run_test(main)
