#!/usr/bin/env python3
"""vkick's built-in demo testbed (the main job of scripts/run.sh).

Starts, on this machine only (unix sockets and loopback), the whole loop:
  qemu-storage-daemon   a vhost-user-blk export "disk0" (null-co backend)
  vkickd                the host daemon: host probes, control loop (default
                        policy adaptive), admin socket, /metrics
  vkick-agent           samples vkick-blk's queue depth and latency with eBPF
                        (USDT) and applies the policies vkickd sends
  vkick-blk             the userspace virtio-blk driver, the export's
                        vhost-user frontend, policy `adaptive`, whose queue
                        depth changes over time (--qd_schedule)
and prints `vkickctl status` every few seconds beside the depth the workload
is running at, so adaptive can be seen following the load: B grows with the
depth, notifications per request fall, and at depth 1 B is 1 (no added
latency). Ctrl-C (or --duration) stops everything it started, by PID.
"""

import argparse
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request



def log(*a):
    print("[demo]", *a, flush=True)


class Proc:
    def __init__(self, name, argv, logdir):
        self.name = name
        self.log_path = os.path.join(logdir, name + ".log")
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()

    def tail(self, n=15):
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise SystemExit("demo: timed out waiting for %s" % what)


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


SCHEDULE = [(1, 15), (8, 15), (32, 15), (128, 15), (4, 15)]


def depth_at(elapsed):
    period = sum(d for _, d in SCHEDULE)
    t = elapsed % period
    for qd, d in SCHEDULE:
        if t < d:
            return qd
        t -= d
    return SCHEDULE[-1][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build"))
    ap.add_argument("--listen", default="127.0.0.1:9470", help="vkickd's /metrics address")
    ap.add_argument("--duration", type=float, default=0, help="seconds (0 = until Ctrl-C)")
    ap.add_argument("--every", type=float, default=2.5, help="seconds between status tables")
    args = ap.parse_args()

    bindir = os.path.join(os.path.abspath(args.build_dir), "bin")
    for b in ("vkickd", "vkick-blk", "vkick-agent", "vkickctl"):
        if not os.access(os.path.join(bindir, b), os.X_OK):
            raise SystemExit("demo: %s/%s is missing: run scripts/setup.sh first" % (bindir, b))
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        raise SystemExit("demo: qemu-storage-daemon is missing (Debian package qemu-system-common)")

    tmp = tempfile.mkdtemp(prefix="vkick-demo-")
    procs = []
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def check_alive():
        for p in procs:
            if not p.alive():
                raise SystemExit("demo: %s exited (rc %s):\n%s" % (p.name, p.p.returncode, p.tail()))

    try:
        sock = os.path.join(tmp, "disk0.sock")
        agent_sock = os.path.join(tmp, "agent.sock")
        admin = os.path.join(tmp, "admin.sock")
        rundir = os.path.join(tmp, "run")
        os.makedirs(rundir)
        procs.append(Proc("qemu-storage-daemon", [
            qsd, "--blockdev", "driver=null-co,node-name=disk0,size=%d" % (1 << 30),
            "--export", "type=vhost-user-blk,id=disk0,node-name=disk0,addr.type=unix,"
            "addr.path=%s,num-queues=1,writable=on" % sock], tmp))
        wait_for(lambda: os.path.exists(sock), 10, "the vhost-user socket")

        vkickd = Proc("vkickd", [
            os.path.join(bindir, "vkickd"), "--listen=" + args.listen,
            "--agent-socket=" + agent_sock, "--vhost-user-kicks", "--vhost-user=disk0=" + sock,
            "--state-dir=" + os.path.join(tmp, "state"), "--admin-socket=" + admin,
            "--default-policy=adaptive", "--control-interval=1s", "--lease=5s",
            "--pin-dir="], tmp)  # a demo keeps nothing across runs
        procs.append(vkickd)
        wait_for(lambda: http_ok("http://%s/healthz" % args.listen) or not vkickd.alive(), 20,
                 "vkickd /healthz")
        check_alive()
        procs.append(Proc("vkick-agent", [
            os.path.join(bindir, "vkick-agent"), "--connect=" + agent_sock, "--run-dir=" + rundir,
            "--interval=1s"], tmp))
        time.sleep(1.0)  # the agent connects and announces before the driver starts
        check_alive()
        sched = ",".join("%d:%g" % s for s in SCHEDULE)
        procs.append(Proc("vkick-blk", [
            os.path.join(bindir, "vkick-blk"), "--socket=" + sock, "--run-dir=" + rundir,
            "--rw=randread", "--policy=adaptive", "--qd_schedule=" + sched,
            "--runtime=%g" % (args.duration + 5 if args.duration else 7 * 24 * 3600)], tmp))
        t0 = time.monotonic()
        log("vkickd serves http://%s/metrics   (admin socket %s, logs in %s)" % (args.listen, admin, tmp))
        log("workload depth schedule (s): %s, cycled; policy adaptive; Ctrl-C stops" % sched)

        while not stop["now"]:
            if args.duration and time.monotonic() - t0 > args.duration:
                break
            time.sleep(args.every)
            check_alive()
            r = subprocess.run([os.path.join(bindir, "vkickctl"), "--socket=" + admin, "status"],
                               capture_output=True, text=True)
            el = time.monotonic() - t0
            print("\n[%6.1fs] workload depth %d" % (el, depth_at(el)), flush=True)
            print((r.stdout if r.returncode == 0 else "vkickctl: " + r.stderr).rstrip(), flush=True)
        log("stopping")
    finally:
        for p in reversed(procs):
            p.stop()
        if os.environ.get("VKICK_KEEP_TMP"):
            log("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
