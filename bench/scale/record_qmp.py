#!/usr/bin/env python3
"""Records what vkickd asks a real QEMU over QMP, and QEMU's replies.

The fixture fake_qmp.py replays (bench/scale/qmp_recording.json). QEMU 7.2,
TCG, `-machine pc -nodefaults`, one vCPU, and the devices of the scale
benchmark's VM:

  virtio-blk-pci    id=disk0, num-queues=4, on a 1 MiB raw file
  virtio-serial-pci id=vser0, max_ports=2, with a virtserialport named
                    org.vkick.agent.0 (vkickd's agent port) on a unix
                    socket chardev (server=on)

QEMU starts paused (-S); the recorder lets SeaBIOS run until it has assigned
every BAR (vkickd then computes notify addresses, as for any running VM) and
stops the VM again, on a second monitor of its own. Then vkickd (--no-probes:
the probes do not change what it asks) is pointed at a proxy in front of
QEMU's other monitor for --seconds; every line both ways is kept.

The fixture holds: the greeting; every distinct request (command and
arguments, without the id) with QEMU's reply; the order and time of every
request vkickd sent (to see what one refresh asks); events (none expected:
the VM is stopped); and the values fake_qmp.py replaces per VM (the -name,
QEMU's pid for the vCPU thread-ids, the chardev socket path).

  bench/scale/record_qmp.py [--vm=agent|blk4] [--out=FILE]
Needs qemu-system-x86_64 and build/bin/vkickd; no root. Exits 77 without QEMU.
"""
import argparse
import datetime
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from fake_qmp import DEFAULT_RECORDING, request_key

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NAME = "vkick-scale-recorded"
AGENT_PORT = "org.vkick.agent.0"
VMS = {
    "agent": ("4-queue virtio-blk-pci and virtio-serial-pci (max_ports=2) with the agent port, "
              "transitional: 10 queues, 12 notify addresses", DEFAULT_RECORDING),
    "blk4": ("4-queue virtio-blk-pci, modern-only: 4 queues, 4 notify addresses, no agent port",
             os.path.join(HERE, "qmp_recording_blk4.json")),
}


def devices(vm, disk, agent_sock):
    """QEMU arguments of the devices of `vm` (see VMS)."""
    out = ["-blockdev", "driver=file,filename=%s,node-name=disk0file" % disk,
           "-blockdev", "driver=raw,file=disk0file,node-name=disk0fmt"]
    if vm == "blk4":
        return out + ["-device", "virtio-blk-pci,id=disk0,drive=disk0fmt,num-queues=4,"
                                 "disable-legacy=on"]
    return out + [
        "-device", "virtio-blk-pci,id=disk0,drive=disk0fmt,num-queues=4",
        "-device", "virtio-serial-pci,id=vser0,max_ports=2",
        "-chardev", "socket,id=agent0,path=%s,server=on,wait=off" % agent_sock,
        "-device", "virtserialport,id=port0,bus=vser0.0,chardev=agent0,name=%s" % AGENT_PORT]


def connect(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Monitor:
    """The recorder's own QMP monitor (cont/stop and checks)."""

    def __init__(self, path):
        self.f = connect(path).makefile("rwb")
        self.greeting = json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError("%s: %s" % (name, r["error"]))
            return r["return"]


def bars_assigned(pci):
    """Every virtio function's BARs have an address (SeaBIOS has run)."""
    devs = [d for bus in pci for d in bus["devices"] if d["id"]["vendor"] == 0x1af4]
    return devs and all(r["address"] != -1 for d in devs for r in d["regions"])


def proxy(listen_path, target_path, seconds, log):
    """Forwards every connection to `listen_path` to `target_path` for
    `seconds`; appends (t, conn, direction, parsed message) to `log`."""
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(listen_path)
    lsock.listen(4)
    sel.register(lsock, selectors.EVENT_READ, None)
    t0 = time.monotonic()
    bufs = {}
    nconn = 0
    while time.monotonic() - t0 < seconds:
        for key, _ in sel.select(timeout=0.1):
            if key.data is None:
                client, _ = lsock.accept()
                upstream = connect(target_path)
                nconn += 1
                sel.register(client, selectors.EVENT_READ, (upstream, nconn, "request"))
                sel.register(upstream, selectors.EVENT_READ, (client, nconn, "reply"))
                continue
            other, conn, direction = key.data
            data = key.fileobj.recv(65536)
            if not data:
                for s in (key.fileobj, other):
                    sel.unregister(s)
                    s.close()
                continue
            other.sendall(data)
            buf = bufs.get(key.fileobj, b"") + data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    log.append((time.monotonic() - t0, conn, direction, json.loads(line)))
            bufs[key.fileobj] = buf
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()


def build_fixture(log, meta, subst):
    greeting, exchanges, sequence, events = None, {}, [], []
    pending = {}  # (conn, id) -> key
    for t, conn, direction, msg in log:
        if direction == "request":
            key = request_key(msg)
            pending[(conn, json.dumps(msg.get("id")))] = key
            sequence.append({"t": round(t, 4), "conn": conn, "key": key})
        elif "QMP" in msg:
            greeting = greeting or msg
        elif "event" in msg:
            events.append(msg)
        else:
            key = pending.pop((conn, json.dumps(msg.pop("id", None))), None)
            if key is None:
                raise RuntimeError("a reply to no request: %r" % msg)
            if key in exchanges and exchanges[key] != msg:
                raise RuntimeError("QEMU answered %s differently within the recording" % key)
            exchanges[key] = msg
    if pending:
        raise RuntimeError("requests without a reply: %s" % sorted(pending.values()))
    keys = sorted(exchanges, key=lambda k: next(i for i, s in enumerate(sequence)
                                                if s["key"] == k))
    return {
        "meta": meta,
        "substitutions": subst,
        "greeting": greeting,
        "exchanges": [{"key": k, "reply": exchanges[k]} for k in keys],
        "events": events,
        "sequence": [[s["t"], s["conn"], keys.index(s["key"])] for s in sequence],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--vm", choices=sorted(VMS), default="agent", help="which VM (see above)")
    ap.add_argument("--out", help="the fixture (default: the --vm's, in bench/scale)")
    ap.add_argument("--build-dir", default=os.environ.get("VKICK_BUILD_DIR",
                                                          os.path.join(REPO, "build")))
    ap.add_argument("--seconds", type=float, default=4.5,
                    help="how long vkickd talks to QEMU (4 refreshes at its default 1s)")
    args = ap.parse_args()
    args.out = args.out or VMS[args.vm][1]
    qemu_bin = shutil.which("qemu-system-x86_64")
    if qemu_bin is None:
        print("skip: qemu-system-x86_64 not found")
        return 77
    vkickd = os.path.join(args.build_dir, "bin", "vkickd")
    if not os.access(vkickd, os.X_OK):
        print("error: %s not built (ninja -C build vkickd)" % vkickd, file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="vkick-scale-rec-", dir="/tmp")
    procs = []
    try:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        agent_sock = os.path.join(tmp, "agent.sock")
        ctl_qmp, vm_qmp, proxy_qmp = (os.path.join(tmp, n)
                                      for n in ("ctl.qmp", "vm.qmp", "proxy.qmp"))
        qemu_argv = [
            qemu_bin, "-machine", "pc", "-accel", "tcg", "-S", "-nodefaults",
            "-no-user-config", "-display", "none", "-name", NAME, "-m", "64", "-smp", "1"
        ] + devices(args.vm, disk, agent_sock) + [
            "-qmp", "unix:%s,server=on,wait=off" % ctl_qmp,
            "-qmp", "unix:%s,server=on,wait=off" % vm_qmp]
        qemu = subprocess.Popen(qemu_argv)
        procs.append(qemu)
        mon = Monitor(ctl_qmp)
        mon.cmd("cont")
        deadline = time.monotonic() + 30
        while not bars_assigned(mon.cmd("query-pci")):
            if time.monotonic() > deadline:
                raise RuntimeError("SeaBIOS did not assign the BARs within 30 s")
            time.sleep(0.1)
        mon.cmd("stop")
        version = subprocess.run([qemu_bin, "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        print("record: %s, BARs assigned, VM stopped; vkickd for %.1f s" %
              (version, args.seconds), file=sys.stderr)

        log = []
        vkickd_argv = [vkickd, "--no-probes", "--qmp=" + proxy_qmp,
                       "--listen=127.0.0.1:0", "--admin-socket=" + os.path.join(tmp, "admin.sock"),
                       "--state-dir=" + os.path.join(tmp, "state")]
        vk_log = open(os.path.join(tmp, "vkickd.log"), "w+")
        # The proxy listens before vkickd starts.
        th = threading.Thread(target=proxy, args=(proxy_qmp, vm_qmp, args.seconds, log))
        th.start()
        while not os.path.exists(proxy_qmp):
            time.sleep(0.01)
        vk = subprocess.Popen(vkickd_argv, stderr=vk_log, stdout=vk_log)
        procs.append(vk)
        th.join()
        vk.terminate()
        vk.wait(15)
        vk_log.seek(0)
        vk_text = vk_log.read()
        vk_version = next((l.split("vkickd ", 1)[1].split(" ")[0] for l in vk_text.splitlines()
                           if "vkickd " in l and " listening on " in l), "unknown")
        mon.cmd("quit")
        qemu.wait(10)

        meta = {
            "recorded": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "by": "bench/scale/record_qmp.py --vm=%s" % args.vm,
            "vm": VMS[args.vm][0],
            "qemu": version,
            "qemu_argv": [a.replace(tmp, "$TMP") for a in qemu_argv],
            "vkickd": "%s, version %s, built %s" % (
                os.path.relpath(vkickd, REPO) if vkickd.startswith(REPO + "/") else vkickd,
                vk_version, time.strftime("%Y-%m-%d %H:%M", time.localtime(
                    os.path.getmtime(vkickd)))),
            "vkickd_argv": [a.replace(tmp, "$TMP") for a in vkickd_argv],
            "seconds": args.seconds,
            "note": "The VM was stopped after SeaBIOS assigned the BARs; replies to a "
                    "stopped VM do not change, so one reply per request is kept.",
        }
        # Paths in replies, per VM: the agent's chardev (a socket fake_qmp
        # serves) and QEMU's monitors (vkickd's own is DIR/vm<i>.qmp).
        subst = {"name": NAME, "pid": qemu.pid,
                 "paths": {vm_qmp: "qmp", ctl_qmp: "ctl.qmp"}, "serve": []}
        if args.vm == "agent":
            subst["paths"][agent_sock] = "agent"
            subst["serve"] = ["agent"]
        fixture = build_fixture(log, meta, subst)
        if not fixture["exchanges"]:
            raise RuntimeError("vkickd sent nothing; its log:\n" + vk_text)
        with open(args.out, "w") as f:
            json.dump(fixture, f, indent=1, sort_keys=False)
            f.write("\n")
        n = sum(1 for s in fixture["sequence"])
        print("record: %d requests (%d distinct) over %d connection(s), %d events -> %s" %
              (n, len(fixture["exchanges"]), len({s[1] for s in fixture["sequence"]}),
               len(fixture["events"]), args.out), file=sys.stderr)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
