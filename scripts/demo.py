#!/usr/bin/env python3
"""vkick's built-in demo testbed (the main job of scripts/run.sh).

Starts, on this machine only (unix sockets and loopback):
  qemu-storage-daemon   a vhost-user-blk export (null-co backend)
  vkickd                the host daemon, serving /metrics
  vkick-blk             the userspace virtio-blk driver, as the export's
                        vhost-user frontend, whose queue depth changes phase
                        by phase (1 -> 8 -> 32 -> 128 -> 32 -> 4 -> 1 ...)
and prints one line per phase: depth, policy, IOPS, kicks per request and
latency, side by side for `immediate` and the demo policy, so the effect of
batching and deferral on the kick path is visible. Ctrl-C (or --duration)
stops everything it started, by PID.
"""

import argparse
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

PHASES = [1, 8, 32, 128, 32, 4]


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build"))
    ap.add_argument("--listen", default="127.0.0.1:9470", help="vkickd's /metrics address")
    ap.add_argument("--duration", type=float, default=0, help="seconds (0 = until Ctrl-C)")
    ap.add_argument("--phase-seconds", type=float, default=3.0)
    ap.add_argument("--policy", default="static:16,50us",
                    help="the policy shown beside immediate (vkick-blk --policy syntax)")
    args = ap.parse_args()

    bindir = os.path.join(os.path.abspath(args.build_dir), "bin")
    for b in ("vkickd", "vkick-blk"):
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

    try:
        sock = os.path.join(tmp, "vkblk0.sock")
        procs.append(Proc("qemu-storage-daemon", [
            qsd, "--blockdev", "driver=null-co,node-name=disk0,size=%d" % (1 << 30),
            "--export", "type=vhost-user-blk,id=vkblk0,node-name=disk0,addr.type=unix,"
            "addr.path=%s,num-queues=1,writable=on" % sock], tmp))
        wait_for(lambda: os.path.exists(sock), 10, "the vhost-user socket")

        vkickd = Proc("vkickd", [os.path.join(bindir, "vkickd"), "--listen=" + args.listen], tmp)
        procs.append(vkickd)
        wait_for(lambda: http_ok("http://%s/healthz" % args.listen) or not vkickd.alive(), 20,
                 "vkickd /healthz")
        if not vkickd.alive():
            raise SystemExit("demo: vkickd exited:\n" + vkickd.tail())
        log("vkickd serves http://%s/metrics   (logs in %s)" % (args.listen, tmp))
        log("phases of %.0fs; each depth runs `immediate` then `%s` on the same device"
            % (args.phase_seconds, args.policy))
        print("%6s  %-16s %10s %9s %11s %10s %10s" % (
            "depth", "policy", "IOPS", "kicks/req", "cpu us/req", "p50 us", "p99 us"), flush=True)

        start = time.monotonic()
        i = 0
        while not stop["now"]:
            if args.duration and time.monotonic() - start > args.duration:
                break
            qd = PHASES[i % len(PHASES)]
            i += 1
            for policy in ("immediate", args.policy):
                if stop["now"]:
                    break
                r = subprocess.run([os.path.join(bindir, "vkick-blk"), "--socket=" + sock,
                                    "--rw=randread", "--qd=%d" % qd, "--policy=" + policy,
                                    "--runtime=%g" % (args.phase_seconds / 2), "--json"],
                                   capture_output=True, text=True, start_new_session=True)
                if r.returncode != 0:
                    if stop["now"]:
                        break
                    raise SystemExit("demo: vkick-blk failed (rc %d):\n%s" % (r.returncode, r.stderr))
                j = json.loads(r.stdout.strip().splitlines()[-1])
                print("%6d  %-16s %10.0f %9.4f %11.2f %10.1f %10.1f" % (
                    qd, policy, j["iops"], j["kicks_per_request"], j["cpu_us_per_request"],
                    j["lat_p50_us"], j["lat_p99_us"]), flush=True)
        log("stopping")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
