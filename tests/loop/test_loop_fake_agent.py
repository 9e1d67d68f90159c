#!/usr/bin/env python3
"""The vkickd side of the closed loop (issue 4), with a real vkickd process
and a fake agent speaking docs/protocol.md:

1. policy switches with vkickctl reach the agent within one interval
   (static, then adaptive); under adaptive B follows the reported depth
   (QD 32 -> 16, QD 4 -> 2, QD 1 -> 1); vkickctl status and /metrics show it;
2. vkickd SIGKILLed and restarted with the same --state-dir: the policy is
   restored and the agent reconnects and gets it again;
3. hostile agents (garbage, oversized frame, out-of-range field, flooding):
   rejections counted by reason, connections dropped, vkickd still serves and
   the good agent stays connected;
4. the admin socket refuses a non-root uid (needs root to switch uid).
"""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
sys.path.insert(0, HERE)

from vkicktest import Testbed, Vkickd, log, run_test, wait_until, build_dir, http_get  # noqa: E402
import fake_agent as fa  # noqa: E402

INTERVAL = 0.5


def vkickctl_path():
    p = os.path.join(build_dir(), "bin", "vkickctl")
    if not os.access(p, os.X_OK):
        raise AssertionError("vkickctl not built at %s (build target 'vkickctl')" % p)
    return p


def ctl(admin, *args, check=True, user=None):
    argv = [vkickctl_path(), "--socket=" + admin] + list(args)
    if user is not None:
        argv = ["setpriv", "--reuid=%d" % user, "--regid=%d" % user, "--clear-groups"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    log("vkickctl %s -> %d %s%s" % (" ".join(args), r.returncode, r.stdout.strip()[:300],
                                    r.stderr.strip()))
    if check and r.returncode != 0:
        raise AssertionError("vkickctl %s failed (%d): %s" % (args, r.returncode, r.stderr))
    return r


def status(admin):
    return json.loads(ctl(admin, "status", "--json").stdout)


def queue_row(st, q=0):
    for r in st["queues"]:
        if r["device"] == "blk0" and r["queue"] == q:
            return r
    return None


def start_vkickd(tb, name_suffix=""):
    args = ["--no-probes", "--agent-socket=" + tb.path("agent.sock"),
            "--vhost-user-kicks", "--vhost-user=blk0=" + tb.path("blk0.sock"),
            "--state-dir=" + tb.path("state"), "--admin-socket=" + tb.path("admin.sock"),
            "--control-interval=%dms" % int(INTERVAL * 1000), "--lease=3s"]
    return Vkickd(tb, [], extra=args)


def wait_policy(agent, pred, what, timeout):
    t0 = time.monotonic()
    wait_until(lambda: agent.policy() is not None and pred(agent.policy()), timeout, what,
               interval=0.02)
    return time.monotonic() - t0


def rejected(vk, reason):
    return vk.metrics().value("vkick_agent_messages_rejected_total", vm="vhost-user",
                              reason=reason) or 0


def raw_connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    return s


def closed_by_vkickd(s, timeout=5):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def main():
    vkickctl_path()
    with Testbed("loop") as tb:
        admin = tb.path("admin.sock")
        vk = start_vkickd(tb)
        agent = fa.FakeAgent(tb.path("agent.sock"), [("blk0", 2)], depth=1)
        tb.callback(agent.stop)

        # Default policy reaches the agent.
        wait_policy(agent, lambda p: p["mode"] == "immediate", "default policy at the agent", 10)
        p0 = agent.policy()
        assert p0["lease_ns"] == 3_000_000_000, p0
        wait_until(lambda: vk.metrics().value("vkick_agent_connected", vm="vhost-user") == 1,
                   10, "vkick_agent_connected 1")

        # 1a. static within one interval.
        ctl(admin, "policy", "set", "--vm", "vhost-user", "--device", "blk0", "static",
            "--batch", "8", "--defer-us", "50")
        dt = wait_policy(agent, lambda p: p["mode"] == "static" and p["batch"] == 8
                         and p["defer_ns"] == 50_000, "static B=8 T=50us at the agent",
                         INTERVAL + 1.0)
        log("static reached the agent in %.3fs (interval %.1fs)" % (dt, INTERVAL))
        assert dt <= INTERVAL + 0.25, "switch took %.3fs, more than one interval" % dt
        assert agent.policy(0, 1)["mode"] == "static", "device scope covers queue 1 too"
        gen_static = agent.policy()["generation"]
        time.sleep(3 * INTERVAL)
        assert agent.policy()["generation"] == gen_static, "generation changed without a change"
        st = status(admin)
        row = queue_row(st)
        assert row["mode"] == "static" and row["batch"] == 8 and row["source"] == "device", row
        assert row["acked_generation"] == row["generation"], row
        table = ctl(admin, "status").stdout
        assert "static(device)" in table and "vhost-user" in table, table

        # 1b. adaptive: B follows the depth the agent reports.
        agent.depth = 32
        agent.rate = 40000
        ctl(admin, "policy", "set", "--vm", "vhost-user", "--device", "blk0", "adaptive")
        wait_policy(agent, lambda p: p["mode"] == "event-idx", "adaptive (event-idx + B) at the agent",
                    INTERVAL + 1.0)
        wait_policy(agent, lambda p: p["batch"] == 16 and p["defer_ns"] >= 1000,
                    "adaptive B=16 at QD 32", 15)
        m = vk.metrics()
        assert m.value("vkick_queue_batch_threshold", vm="vhost-user", device="blk0",
                       queue="0") == 16
        assert m.value("vkick_queue_policy_info", vm="vhost-user", device="blk0", queue="0",
                       mode="adaptive", source="device") == 1
        assert (m.value("vkick_virtqueue_depth_count", vm="vhost-user", device="blk0",
                        queue="0") or 0) > 0
        assert (m.value("vkick_policy_switches_total", vm="vhost-user", device="blk0",
                        queue="0") or 0) >= 2
        # The next sample reports B=16 applied: < 0.1 notifications/request.
        row = wait_until(lambda: (lambda r: r if r["applied_batch"] == 16
                                  and r["notifications_per_request"] < 0.1 else None)(
            queue_row(status(admin))), 5, "status shows B=16 applied")
        assert row["batch"] == 16 and abs(row["mean_depth"] - 32) < 1e-6, row
        agent.depth = 4
        wait_policy(agent, lambda p: p["batch"] == 2, "adaptive B=2 at QD 4", 10)
        agent.depth = 1
        wait_policy(agent, lambda p: p["batch"] == 1 and p["defer_ns"] == 0,
                    "adaptive B=1 at QD 1", 10)
        agent.depth = 32
        wait_policy(agent, lambda p: p["batch"] == 16, "adaptive B=16 again", 15)

        # 2. SIGKILL vkickd, restart with the same state dir.
        connects = agent.connects
        vk.proc.kill()
        log("vkickd killed (pid %d)" % vk.proc.pid)
        time.sleep(1.0)
        assert agent.policy()["mode"] == "event-idx"  # the agent keeps it (lease runs)
        vk = start_vkickd(tb)
        wait_until(lambda: agent.connects > connects, 10, "the agent reconnects")
        row = wait_until(lambda: (lambda r: r if r and r["agent"] else None)(
            queue_row(status(admin))), 10, "restarted vkickd sees the agent")
        assert row["mode"] == "adaptive" and row["source"] == "device", row
        gen_before = agent.policy()["generation"]
        wait_policy(agent, lambda p: p["generation"] > gen_before and p["mode"] == "event-idx",
                    "restored adaptive policy sent by the new vkickd", 5)
        assert "restored 1 policy entries" in vk.proc.output(), vk.proc.tail()

        # 3. Hostile agents.
        s = raw_connect(tb.path("agent.sock"))
        s.sendall(b"\x00garbage garbage garbage" * 4)
        assert closed_by_vkickd(s), "garbage did not drop the connection"
        s.close()
        s = raw_connect(tb.path("agent.sock"))
        s.sendall(fa.frame(fa.T_SAMPLE, b"", length=10_000_000))
        assert closed_by_vkickd(s), "oversized frame did not drop the connection"
        s.close()
        s = raw_connect(tb.path("agent.sock"))
        s.sendall(fa.hello("hostile", [("blk0", 1)]))
        bad = fa.queue_sample(0, 0, 1, 10, (0, 1, 0, 0), interval_ns=0)  # < 1 ms
        s.sendall(fa.sample(1, [bad]))
        for seq in range(2, 200):  # flood: rate limit, then dropped
            try:
                s.sendall(fa.sample(seq, [fa.queue_sample(0, 0, 1, 10, (0, 1, 0, 0))]))
            except OSError:
                break
        assert closed_by_vkickd(s), "flooding did not drop the connection"
        s.close()
        wait_until(lambda: rejected(vk, "bad_magic") >= 1 and rejected(vk, "oversized") >= 1
                   and rejected(vk, "field_out_of_range") >= 1
                   and rejected(vk, "rate_limited") >= 1, 10, "rejections counted by reason")
        m = vk.metrics()
        assert m.value("vkick_agent_connections_dropped_total", vm="vhost-user") >= 3
        # The hostile agent's hello named blk0 too: nothing new became a label.
        devs = {l.get("device") for l, _ in m.select("vkick_queue_policy_info")}
        assert devs == {"blk0"}, devs
        assert m.value("vkick_agent_connected", vm="vhost-user") == 1
        gen = agent.policy()["generation"]
        ctl(admin, "policy", "set", "--vm", "vhost-user", "--device", "blk0", "immediate")
        wait_policy(agent, lambda p: p["mode"] == "immediate" and p["generation"] > gen,
                    "the good agent still gets policies", INTERVAL + 1.0)

        # Bad vkickctl usage: exit 2 with a message.
        r = ctl(admin, "policy", "set", "--vm", "vhost-user", "static", "--batch", "8",
                check=False)
        assert r.returncode == 2 and "defer" in r.stderr, r
        r = ctl(tb.path("nope.sock"), "status", check=False)
        assert r.returncode == 2 and "not running" in r.stderr, r

        # 4. The admin socket refuses another uid.
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            log("SKIP part 4: needs root and setpriv to run vkickctl as nobody")
        else:
            nobody = pwd.getpwnam("nobody").pw_uid
            os.chmod(tb.tmp, 0o755)
            r = ctl(admin, "status", check=False, user=nobody)
            assert r.returncode == 2 and "permission denied" in r.stderr, r  # mode 0600
            os.chmod(admin, 0o666)  # let connect() through: SO_PEERCRED must refuse
            r = ctl(admin, "status", check=False, user=nobody)
            assert r.returncode == 2 and "permission denied" in r.stderr, r
            assert vk.metrics().value("vkick_admin_requests_refused_total",
                                      reason="peer_credentials") == 1

        # Still healthy, and the metrics are promtool-clean if promtool exists.
        assert vk.metrics().value("vkick_build_info") is not None
        if shutil.which("promtool"):
            code, text = http_get(vk.url + "/metrics")
            assert code == 200
            r = subprocess.run(["promtool", "check", "metrics"], input=text,
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            log("promtool check metrics: clean")
        else:
            log("promtool not installed: exposition lint skipped")
        vk.proc.stop()
        assert vk.proc.returncode() == 0, vk.proc.tail()


if __name__ == "__main__":
    run_test(main)
