#!/usr/bin/env python3
"""vkick-blk against a real qemu-storage-daemon (vhost-user-blk export).

Usage: blk_test.py CASE   (CASE: policies, ratios, adaptive, lease, registry,
                           errors, disconnect; see CASES below)

Each case starts its own qsd on a unique socket in its own temp dir and kills
only that qsd, by PID. Exit 0 pass, 1 fail, 77 skip (reason printed).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

BUILD = os.environ.get("VKICK_BUILD_DIR", os.path.join(os.path.dirname(__file__), "../../build-blk"))
BLK = os.path.join(BUILD, "bin", "vkick-blk")
QSD = shutil.which("qemu-storage-daemon")

# ---- control block writer (layout: docs/kick-policies.md, control_block.h) ----
MAGIC, VERSION, CB_SIZE, MAX_Q = 0x42434B56, 1, 448, 16
MODE = {"immediate": 0, "event-idx": 1, "static": 2}


def mono_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def cb_header(seq, n):
    return struct.pack("<IHHIHHQ40x", MAGIC, VERSION, CB_SIZE, seq, n, 0, os.getpid())


def cb_entry(mode, batch=1, defer_ns=0, lease_ns=0):
    return struct.pack("<BBHIQQ", MODE[mode], 0, batch, defer_ns, lease_ns, 0)


class ControlWriter:
    """The agent's side: creates the file atomically (tmp + rename), then
    updates it in place under the seqlock (seq odd while writing)."""

    def __init__(self, path):
        self.path, self.seq = path, 0
        self.f = None

    def create(self, mode, batch=1, defer_ns=0, lease_s=60.0):
        tmp = self.path + ".tmp"
        body = cb_header(0, 1) + cb_entry(mode, batch, defer_ns, mono_ns() + int(lease_s * 1e9))
        body += b"\0" * (CB_SIZE - len(body))
        assert len(body) == CB_SIZE
        with open(tmp, "wb") as f:
            f.write(body)
        os.rename(tmp, self.path)
        self.f = open(self.path, "r+b")
        self.seq = 0

    def update(self, mode, batch=1, defer_ns=0, lease_s=60.0):
        import mmap
        with mmap.mmap(self.f.fileno(), CB_SIZE) as m:
            self.seq += 1
            m[8:12] = struct.pack("<I", self.seq)  # odd: being written
            m[64:88] = cb_entry(mode, batch, defer_ns, mono_ns() + int(lease_s * 1e9))
            m[12:14] = struct.pack("<H", 1)
            self.seq += 1
            m[8:12] = struct.pack("<I", self.seq)  # even: published

    def remove(self):
        os.unlink(self.path)


# ---- qsd ----
class Qsd:
    def __init__(self, tmp, backend="null", size_mb=256, name="vu.sock"):
        self.sock = os.path.join(tmp, name)
        if backend == "file":
            img = os.path.join(tmp, "disk.img")
            with open(img, "wb") as f:
                f.truncate(size_mb << 20)
            blockdev = f"driver=file,filename={img},node-name=n0,cache.direct=off"
        else:
            blockdev = f"driver=null-co,node-name=n0,size={size_mb << 20}"
        self.p = subprocess.Popen(
            [QSD, "--blockdev", blockdev, "--export",
             f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={self.sock},num-queues=2,writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while not os.path.exists(self.sock):
            if self.p.poll() is not None or time.time() > deadline:
                raise RuntimeError("qsd did not start: " + self.p.stderr.read().decode(errors="replace"))
            time.sleep(0.02)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()  # our own child, by PID
        self.p.wait()


FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)
    return cond


def blk(args, timeout=60, env=None):
    """Runs vkick-blk --json; returns (rc, json or None, stderr, seconds)."""
    t0 = time.time()
    p = subprocess.run([BLK] + args, capture_output=True, text=True, timeout=timeout, env=env)
    dt = time.time() - t0
    j = None
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
    return p.returncode, j, p.stderr, dt


def sound(j, label):
    """Nothing lost, nothing corrupted, every request completed once."""
    ok = check(j is not None, f"{label}: json printed")
    if not ok:
        return False
    ok &= check(j["lost"] == 0 and j["errors"] == 0 and j["verify_mismatches"] == 0,
                f"{label}: lost {j['lost']} errors {j['errors']} mismatches {j['verify_mismatches']}")
    ok &= check(j["completions"] == j["requests"] and j["requests"] > 0,
                f"{label}: completions {j['completions']} == requests {j['requests']}")
    ok &= check(j["kicks"] <= j["requests"], f"{label}: kicks {j['kicks']} <= requests {j['requests']}")
    return ok


# ---- cases ----
def case_policies(tmp):
    """verify (write pattern, flush, read back) on a file backend under every
    policy, polling and interrupt completions."""
    q = Qsd(tmp, "file", 64)
    cw = ControlWriter(os.path.join(tmp, "cb"))
    cw.create("static", 16, 100_000)
    try:
        for pol in ["immediate", "event-idx", "static:8,50us", "static:64,1ms", "adaptive"]:
            for comp in ["poll", "interrupt"]:
                rc, j, err, _ = blk(["--socket", q.sock, "--run-dir", tmp, "--rw=verify", "--verify_size=16m",
                                     "--qd=32", "--queues=2", f"--policy={pol}", f"--completion={comp}",
                                     "--control", cw.path, "--json"])
                label = f"verify {pol} {comp}"
                check(rc == 0, f"{label}: exit 0 (rc {rc} {err.strip()[:200]})")
                if sound(j, label) and pol == "adaptive":
                    check(j["control_mapped"] and j["kicks_by_why"]["batch-full"] > 0,
                          f"{label}: control block mapped, batches from it")
    finally:
        q.kill()
    # null-co discards writes: verify must fail and say why.
    q = Qsd(tmp, "null", 64, "null.sock")
    try:
        rc, j, err, _ = blk(["--socket", q.sock, "--run-dir", tmp, "--rw=verify", "--verify_size=1m", "--json"])
        check(rc == 1 and "null-co" in err, f"verify on null-co fails with a hint (rc {rc}: {err.strip()[:160]})")
    finally:
        q.kill()


def case_ratios(tmp):
    """Kicks per request: immediate 1, static:B at QD >= B about 1/B,
    event-idx < 1; --json has the documented fields."""
    q = Qsd(tmp, "null")
    try:
        res = {}
        for pol in ["immediate", "static:8,1ms", "static:32,1ms", "event-idx"]:
            rc, j, err, _ = blk(["--socket", q.sock, "--run-dir", tmp, "--rw=randread", "--qd=32", "--runtime=1",
                                 f"--policy={pol}", "--json"])
            check(rc == 0, f"{pol}: exit 0 ({err.strip()[:200]})")
            sound(j, pol)
            res[pol] = j
        for f in ["requests", "kicks", "iops", "lat_p50_us", "lat_p99_us", "lat_p999_us", "kicks_per_request",
                  "cpu_us_per_request", "kicks_by_why", "errors", "lost", "policy_changes", "adaptive_fallbacks"]:
            check(f in res["immediate"], f"--json has {f}")
        check(res["immediate"]["kicks_per_request"] == 1.0, "immediate: 1 kick per request")
        for b in (8, 32):
            k = res[f"static:{b},1ms"]["kicks_per_request"]
            check(1.0 / b - 1e-9 <= k <= 1.5 / b, f"static:{b}: kicks/request {k:.4f} close to 1/{b}")
        check(res["event-idx"]["kicks_per_request"] < 1.0,
              f"event-idx: kicks/request {res['event-idx']['kicks_per_request']:.4f} < 1")
        check(res["static:8,1ms"]["iops"] > 0 and res["immediate"]["iops"] > 0, "iops reported")
    finally:
        q.kill()


def case_adaptive(tmp):
    """Live policy change: the test rewrites the control block during a run
    (also removes and recreates it); nothing lost, the changes took effect."""
    q = Qsd(tmp, "file", 128)
    cbp = os.path.join(tmp, "cb")
    cw = ControlWriter(cbp)
    try:
        # 1. Block absent at start, created later: the driver picks it up.
        p = subprocess.Popen([BLK, "--socket", q.sock, "--run-dir", tmp, "--rw=randread", "--qd=32",
                              "--runtime=1.5", "--policy=adaptive", "--control", cbp, "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        cw.create("static", 32, 1_000_000)
        out, err = p.communicate(timeout=30)
        j = json.loads(out.strip().splitlines()[-1])
        sound(j, "late agent")
        check(j["control_maps"] >= 1 and j["policy_changes"] >= 1 and j["kicks_by_why"]["batch-full"] > 0,
              f"late agent: mapped {j['control_maps']}x, {j['policy_changes']} policy changes, batching")
        check(j["kicks_by_why"]["immediate"] > 0, "late agent: immediate fallback before it")
        # 2. Rewritten every 50 ms during a verify run; removed and recreated.
        p = subprocess.Popen([BLK, "--socket", q.sock, "--run-dir", tmp, "--rw=verify", "--verify_size=160m",
                              "--qd=64", "--queues=2", "--policy=adaptive", "--control", cbp, "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cycle = [("static", 16, 50_000), ("event-idx", 1, 0), ("immediate", 1, 0), ("static", 4, 10_000),
                 ("static", 64, 1_000_000)]
        i = 0
        while p.poll() is None and i < 200:
            m, b, t = cycle[i % len(cycle)]
            # Removed for 500 ms (5 re-check periods of 100 ms), then recreated.
            if i == 10:
                cw.remove()
            elif i == 20:
                cw.create(m, b, t)
            elif not 10 < i < 20:
                cw.update(m, b, t)
            i += 1
            time.sleep(0.05)
        out, err = p.communicate(timeout=60)
        check(p.returncode == 0, f"live switch verify: exit 0 ({err.strip()[:200]})")
        j = json.loads(out.strip().splitlines()[-1])
        sound(j, "live switch verify")
        check(i > 21, f"live switch: run long enough for {i} control block writes")
        check(j["policy_changes"] >= 4, f"live switch: {j['policy_changes']} policy changes seen")
        # Each of the 2 queues maps the recreated block (a new inode): 2 + 2.
        # Seeing it absent (an unmap) needs the watcher to run inside the
        # window, which a loaded CI host does not promise: not asserted.
        check(j["control_maps"] >= 4,
              f"live switch: removed/recreated block followed (maps {j['control_maps']}, unmaps {j['control_unmaps']})")
    finally:
        q.kill()


def case_lease(tmp):
    """A lease that expires while the agent is silent: fallback on its own."""
    q = Qsd(tmp, "null")
    cw = ControlWriter(os.path.join(tmp, "cb"))
    try:
        cw.create("static", 32, 1_000_000, lease_s=0.6)
        rc, j, err, _ = blk(["--socket", q.sock, "--run-dir", tmp, "--rw=randread", "--qd=32", "--runtime=1.5",
                             "--policy=adaptive", "--control", cw.path, "--json"])
        check(rc == 0, f"lease: exit 0 ({err.strip()[:200]})")
        sound(j, "lease")
        check(j["adaptive_fallbacks"] >= 1, f"lease: {j['adaptive_fallbacks']} fallback(s) counted")
        check(j["kicks_by_why"]["batch-full"] > 0 and j["kicks_by_why"]["immediate"] > 0,
              f"lease: batched while leased, immediate after ({j['kicks_by_why']})")
    finally:
        q.kill()


def case_registry(tmp):
    """drivers/<pid>.json appears while running with the documented fields,
    and is gone after exit (normal, error, SIGTERM)."""
    q = Qsd(tmp, "null", name="disk-a.sock")
    run = os.path.join(tmp, "run")
    env = dict(os.environ, VKICK_RUN_DIR=run)
    try:
        p = subprocess.Popen([BLK, "--socket", q.sock, "--rw=randread", "--qd=4", "--runtime=1.5", "--queues=2",
                              "--queue_size=128", "--policy=adaptive", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        path = os.path.join(run, "drivers", f"{p.pid}.json")
        deadline = time.time() + 5
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.02)
        check(os.path.exists(path), f"registry file {path} appears (VKICK_RUN_DIR honoured)")
        d = json.load(open(path))
        want = {"pid": p.pid, "transport": "vhost-user", "socket": q.sock, "pci": "", "serial": "disk-a",
                "queues": 2, "queue_size": 128, "control_block": f"/dev/shm/vkick/control-{p.pid}",
                "stats_block": f"/dev/shm/vkick/stats-{p.pid}"}
        check(d == want, f"registry fields {d}")
        check(not [f for f in os.listdir(os.path.join(run, "drivers")) if f.endswith(".tmp")], "no tmp file left")
        out, err = p.communicate(timeout=30)
        check(p.returncode == 0, f"registry run: exit 0 ({err.strip()[:200]})")
        check(not os.path.exists(path), "registry file gone after exit")
        # --run-dir and --serial override; SIGTERM still cleans up.
        run2 = os.path.join(tmp, "run2")
        p = subprocess.Popen([BLK, "--socket", q.sock, "--run-dir", run2, "--serial", "abc-123", "--rw=randread",
                              "--runtime=30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        path = os.path.join(run2, "drivers", f"{p.pid}.json")
        deadline = time.time() + 5
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.02)
        check(os.path.exists(path) and json.load(open(path))["serial"] == "abc-123", "--run-dir, --serial honoured")
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        check(not os.path.exists(path), "registry file gone after SIGTERM")
    finally:
        q.kill()


def case_errors(tmp):
    """Missing socket: exit 1, clear, fast. Bad flags: exit 2. No registry left."""
    run = os.path.join(tmp, "run")
    rc, _, err, dt = blk(["--socket", os.path.join(tmp, "nope.sock"), "--run-dir", run])
    check(rc == 1 and "nope.sock" in err and "No such file" in err and dt < 3,
          f"missing socket: rc {rc} in {dt:.2f}s: {err.strip()}")
    for bad in (["--bogus=1"], ["--qd=abc"], ["--policy=static:0,5us", "--socket=/x"], ["--rw=sideways", "--socket=/x"],
                ["--socket=/x", "--pci=0000:00:04.0"], [], ["--socket=/x", "extra"], ["--qd"],
                ["--socket=/x", "--serial=" + "x" * 21], ["--socket=/x", "--serial=my disk"],
                ["--socket=/x", "--serial=a/b"]):
        rc, _, err, _ = blk(bad + ["--run-dir", run])
        check(rc == 2 and err.startswith("vkick-blk:"), f"bad flags {bad}: rc {rc}: {err.strip()[:120]}")
        if any(a.startswith("--serial=my") for a in bad):
            check("[A-Za-z0-9._:-]" in err, f"--serial with a space says why: {err.strip()[:160]}")
    p = subprocess.run([BLK, "--help"], capture_output=True, text=True)
    out = p.stdout + p.stderr
    check(p.returncode == 0 and "--policy" in out and "--run_dir" in out and "--serial" in out and
          "No flags matched" not in out, f"--help lists the flags, exit {p.returncode}")
    drivers = os.path.join(run, "drivers")
    check(not os.path.isdir(drivers) or not os.listdir(drivers), "no registry file left by failed runs")


def case_disconnect(tmp):
    """qsd killed mid-run: vkick-blk exits non-zero within seconds, says why,
    and removes its registry file. Polling and interrupt mode."""
    for comp in ["poll", "interrupt"]:
        q = Qsd(tmp, "null", name=f"dc-{comp}.sock")
        run = os.path.join(tmp, "run-" + comp)
        p = subprocess.Popen([BLK, "--socket", q.sock, "--run-dir", run, "--rw=randread", "--qd=16", "--runtime=60",
                              "--policy=static:8,1ms", f"--completion={comp}", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.7)
        t0 = time.time()
        q.kill()
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            check(False, f"{comp}: vkick-blk hung after the backend died")
            continue
        dt = time.time() - t0
        check(p.returncode not in (0, None) and dt < 6, f"{comp}: exit {p.returncode} {dt:.2f}s after qsd died")
        check("vkick-blk:" in err and ("disconnect" in err or "hung up" in err or "transport" in err or
                                       "closed" in err), f"{comp}: clear message: {err.strip()[:200]}")
        drivers = os.path.join(run, "drivers")
        check(not os.path.isdir(drivers) or not os.listdir(drivers), f"{comp}: registry removed on error exit")


CASES = {"policies": case_policies, "ratios": case_ratios, "adaptive": case_adaptive, "lease": case_lease,
         "registry": case_registry, "errors": case_errors, "disconnect": case_disconnect}


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        print("usage: blk_test.py " + "|".join(CASES))
        return 2
    if not os.access(BLK, os.X_OK):
        print(f"SKIP: {BLK} not built")
        return 77
    if QSD is None:
        print("SKIP: qemu-storage-daemon not installed (Debian qemu-system-common / qemu-utils)")
        return 77
    tmp = tempfile.mkdtemp(prefix=f"vkick-blk-{sys.argv[1]}-")
    try:
        CASES[sys.argv[1]](tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if FAILS:
        print(f"{len(FAILS)} check(s) failed")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
