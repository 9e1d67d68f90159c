#!/usr/bin/env python3
"""fake_vkickd: a development stand-in for vkickd, used only to check the
integration tests' own logic (canary sync, exact counts, bad sockets, VM
going away) before/independently of the real daemon. NOT a test of vkick.

Same command line and metric names as vkickd's contract, but counts KVM
notifications with a private ftrace instance (kvm_mmio / kvm_pio writes)
instead of eBPF, and has no vhost-user support.

  VKICKD=tests/integration/tools/fake_vkickd.py python3 test_kvm_virtio_blk_counts.py
"""

import argparse
import http.server
import json
import os
import re
import socket
import sys
import threading
import time

LOCK = threading.Lock()
VMS = {}          # qmp path -> dict(name, pid, tids, targets{(space, addr[, val])->(dev, q)}, queues)
COUNTS = {}       # (vm, dev, q) -> n
UNMATCHED = {}    # (vm, space) -> n
QMP_ERRORS = {}   # (path, reason) -> n
PATHS = []


def qmp_session(path, timeout=2.0):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")

    def rd():
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("closed")
            m = json.loads(line)
            if "event" not in m:
                return m
    g = rd()
    if "QMP" not in g:
        raise ValueError("no greeting")

    def ex(cmd, **a):
        f.write(json.dumps({"execute": cmd, "arguments": a}).encode() + b"\n")
        f.flush()
        r = rd()
        if "return" not in r:
            raise ValueError(str(r))
        return r["return"]
    ex("qmp_capabilities")
    return s, ex


def discover(path):
    s, ex = qmp_session(path)
    try:
        name = ex("query-name").get("name")
        cpus = ex("query-cpus-fast")
        tids = {c["thread-id"] for c in cpus}
        pid = None
        for t in tids:
            pid = int(open("/proc/%d/status" % t).read().split("Tgid:")[1].split()[0])
        targets, queues = {}, []
        for bus in ex("query-pci"):
            for d in bus["devices"]:
                if d["id"]["vendor"] != 0x1af4:
                    continue
                label = d.get("qdev_id") or "0000:00:%02x.%d" % (d["slot"], d["function"])
                nq = ex("qom-get", path="/machine/peripheral/" + d["qdev_id"], property="num-queues") \
                    if d.get("qdev_id") else 1
                for q in range(nq):
                    queues.append((label, q))
                regs = {r["bar"]: r for r in d.get("regions", [])}
                if d["id"]["device"] < 0x1040 and 0 in regs and regs[0]["type"] == "io" \
                        and regs[0]["address"] not in (0, 0xffffffffffffffff):
                    for q in range(nq):
                        targets[("pio", regs[0]["address"] + 16, q)] = (label, q)
                if 4 in regs and regs[4]["type"] == "memory" and \
                        regs[4]["address"] not in (0, 0xffffffffffffffff):
                    for q in range(nq):  # QEMU 7.2 layout: notify at BAR4+0x3000, mult 4
                        targets[("mmio", regs[4]["address"] + 0x3000 + 4 * q)] = (label, q)
        return dict(name=name or "pid%d" % pid, pid=pid, tids=tids, targets=targets, queues=queues)
    finally:
        s.close()


def discovery_loop(paths, interval):
    while True:
        for p in paths:
            try:
                vm = discover(p)
                with LOCK:
                    VMS[p] = vm
                    for (dev, q) in vm["queues"]:
                        COUNTS.setdefault((vm["name"], dev, q), 0)
            except FileNotFoundError:
                err(p, "missing")
            except socket.timeout:
                err(p, "timeout")
            except (ConnectionError, ConnectionRefusedError):
                err(p, "unavailable")
            except (ValueError, KeyError, UnicodeDecodeError):
                err(p, "garbage")
        time.sleep(interval)


def err(p, reason):
    with LOCK:
        QMP_ERRORS[(p, reason)] = QMP_ERRORS.get((p, reason), 0) + 1
        vm = VMS.pop(p, None)
        if vm:
            for k in [k for k in COUNTS if k[0] == vm["name"]]:
                del COUNTS[k]
            for k in [k for k in UNMATCHED if k[0] == vm["name"]]:
                del UNMATCHED[k]


RE = re.compile(r"-(\d+)\s+\[.*?(kvm_mmio: mmio write len \d+ gpa (0x[0-9a-f]+)|"
                r"kvm_pio: pio_write at (0x[0-9a-f]+) size \d+ count \d+ val (0x[0-9a-f]+))")


def trace_loop():
    inst = "/sys/kernel/tracing/instances/fakevkickd%d" % os.getpid()
    os.mkdir(inst)
    open(inst + "/buffer_size_kb", "w").write("16384")
    open(inst + "/events/kvm/kvm_mmio/filter", "w").write("type == 2")
    open(inst + "/events/kvm/kvm_pio/filter", "w").write("rw == 1")
    open(inst + "/events/kvm/kvm_mmio/enable", "w").write("1")
    open(inst + "/events/kvm/kvm_pio/enable", "w").write("1")
    import atexit
    import select
    stop = threading.Event()
    done = threading.Event()

    def cleanup():
        stop.set()
        done.wait(2)  # the instance cannot be removed while trace_pipe is open
        for e in ("kvm_mmio", "kvm_pio"):
            open(inst + "/events/kvm/%s/enable" % e, "w").write("0")
        os.rmdir(inst)
    atexit.register(cleanup)
    fd = os.open(inst + "/trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    buf = b""

    def lines():
        nonlocal buf
        while not stop.is_set():
            r, _, _ = select.select([fd], [], [], 0.2)
            if not r:
                continue
            try:
                buf += os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            *complete, buf = buf.split(b"\n")
            for ln in complete:
                yield ln.decode("utf-8", "replace")
    try:
        for line in lines():
            m = RE.search(line)
            if not m:
                continue
            tid = int(m.group(1))
            with LOCK:
                vm = next((v for v in VMS.values() if tid in v["tids"]), None)
                if not vm:
                    continue
                if m.group(3):
                    key, space = ("mmio", int(m.group(3), 16)), "mmio"
                else:
                    key, space = ("pio", int(m.group(4), 16), int(m.group(5), 16)), "pio"
                t = vm["targets"].get(key)
                if t:
                    k = (vm["name"], t[0], t[1])
                    COUNTS[k] = COUNTS.get(k, 0) + 1
                else:
                    UNMATCHED[(vm["name"], space)] = UNMATCHED.get((vm["name"], space), 0) + 1
    finally:
        os.close(fd)
        done.set()


class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/healthz":
            body = "ok"
        elif self.path == "/metrics":
            out = []
            with LOCK:
                for vm in VMS.values():
                    out.append('vkick_vm_info{vm="%s",pid="%d"} 1' % (vm["name"], vm["pid"]))
                for (vm, d, q), n in COUNTS.items():
                    out.append('vkick_virtqueue_notifications_total{vm="%s",device="%s",queue="%d"} %d'
                               % (vm, d, q, n))
                for (vm, s), n in UNMATCHED.items():
                    out.append('vkick_vm_unmatched_io_writes_total{vm="%s",space="%s"} %d' % (vm, s, n))
                for p in PATHS:
                    out.append('vkick_qmp_connected{qmp="%s"} %d' % (p, 1 if p in VMS else 0))
                for (p, r), n in QMP_ERRORS.items():
                    out.append('vkick_qmp_errors_total{qmp="%s",reason="%s"} %d' % (p, r, n))
            body = "\n".join(out) + "\n"
        else:
            self.send_error(404)
            return
        b = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qmp", action="append", default=[])
    ap.add_argument("--listen", required=True)
    ap.add_argument("--refresh-interval", default="1s")
    a = ap.parse_args()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: remove the ftrace instance
    PATHS.extend(a.qmp)
    host, port = a.listen.rsplit(":", 1)
    interval = float(a.refresh_interval.rstrip("s"))
    threading.Thread(target=trace_loop, daemon=True).start()
    threading.Thread(target=discovery_loop, args=(a.qmp, interval), daemon=True).start()
    http.server.ThreadingHTTPServer((host, int(port)), H).serve_forever()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
