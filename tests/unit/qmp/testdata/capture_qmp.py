#!/usr/bin/env python3
"""Captures real QEMU QMP replies as test data for the QMP parsing tests.

Run from anywhere (needs qemu-system-x86_64 and qemu-storage-daemon):
    python3 tests/unit/qmp/testdata/capture_qmp.py tests/unit/qmp/testdata
Each file holds exactly the JSON line QEMU sent (the "return" object, or the
greeting/event), so tests parse what QEMU 7.2 really says.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.1)
        self.f = self.s.makefile("rwb")
        self.events = []
        self.greeting = self.f.readline()

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            obj = json.loads(line)
            if "event" in obj:
                self.events.append(line)
                continue
            return line


def save(outdir, name, line):
    with open(os.path.join(outdir, name), "wb") as f:
        f.write(line if line.endswith(b"\n") else line + b"\n")


def main():
    outdir = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="vkick-capture-")
    procs = []
    try:
        vhost_sock = os.path.join(tmp, "vhost.sock")
        qsd = subprocess.Popen([
            "qemu-storage-daemon", "--blockdev", "driver=null-co,node-name=null0,size=67108864",
            "--export", "type=vhost-user-blk,id=exp0,node-name=null0,num-queues=2,"
            "addr.type=unix,addr.path=" + vhost_sock])
        procs.append(qsd)
        for _ in range(100):
            if os.path.exists(vhost_sock):
                break
            time.sleep(0.1)
        qmp_sock = os.path.join(tmp, "qmp.sock")
        qemu = subprocess.Popen([
            "qemu-system-x86_64", "-S", "-display", "none", "-accel", "tcg", "-smp", "2",
            "-name", "capture-vm", "-m", "256",
            "-object", "memory-backend-memfd,id=mem0,size=256M,share=on",
            "-machine", "pc,memory-backend=mem0",
            "-nodefaults", "-no-user-config",
            "-blockdev", "driver=null-co,node-name=nb0",
            "-blockdev", "driver=null-co,node-name=nb1",
            "-blockdev", "driver=null-co,node-name=nb2",
            "-device", "virtio-blk-pci,id=legacy0,drive=nb0,disable-modern=on,num-queues=2",
            "-device", "virtio-blk-pci,id=modern0,drive=nb1,disable-legacy=on,num-queues=3,page-per-vq=on",
            "-device", "pci-bridge,id=br0,chassis_nr=1",
            "-device", "virtio-blk-pci,drive=nb2,bus=br0,addr=0x3,num-queues=1",
            "-chardev", "socket,id=vu0,path=" + vhost_sock,
            "-device", "vhost-user-blk-pci,id=vublk0,chardev=vu0,num-queues=2",
            "-qmp", "unix:%s,server=on,wait=off" % qmp_sock])
        procs.append(qemu)
        q = Qmp(qmp_sock)
        save(outdir, "greeting.json", q.greeting)
        save(outdir, "qmp_capabilities.json", q.cmd("qmp_capabilities"))
        save(outdir, "query-name.json", q.cmd("query-name"))
        save(outdir, "query-cpus-fast.json", q.cmd("query-cpus-fast"))
        save(outdir, "query-pci-unassigned.json", q.cmd("query-pci"))
        save(outdir, "query-chardev.json", q.cmd("query-chardev"))
        save(outdir, "x-query-virtio.json", q.cmd("x-query-virtio"))
        save(outdir, "x-query-virtio-status-legacy0.json",
             q.cmd("x-query-virtio-status", path="/machine/peripheral/legacy0/virtio-backend"))
        for prop in ["disable-legacy", "disable-modern", "page-per-vq", "num-queues"]:
            save(outdir, "qom-get-modern0-%s.json" % prop,
                 q.cmd("qom-get", path="/machine/peripheral/modern0", property=prop))
        save(outdir, "qom-get-legacy0-disable-legacy.json",
             q.cmd("qom-get", path="/machine/peripheral/legacy0", property="disable-legacy"))
        save(outdir, "qom-get-vublk0-chardev.json",
             q.cmd("qom-get", path="/machine/peripheral/vublk0", property="chardev"))
        save(outdir, "qom-get-vublk0-num-queues.json",
             q.cmd("qom-get", path="/machine/peripheral/vublk0/virtio-backend", property="num-queues"))
        save(outdir, "qom-get-chardev-vu0-addr.json",
             q.cmd("qom-get", path="/chardevs/vu0", property="addr"))
        save(outdir, "error-qom-get-missing.json",
             q.cmd("qom-get", path="/machine/peripheral/nosuch", property="num-queues"))
        save(outdir, "error-unknown-command.json", q.cmd("no-such-command"))
        q.cmd("cont")
        # SeaBIOS assigns the BARs within a few hundred ms of TCG time.
        deadline = time.time() + 30
        while time.time() < deadline:
            line = q.cmd("query-pci")
            # Unassigned BARs read as -1; the bridge's devices appear once
            # SeaBIOS gave it a secondary bus number.
            if b'"address": -1' not in line and b'"devices": [{' in line.split(b"pci_bridge", 1)[-1]:
                break
            time.sleep(0.2)
        save(outdir, "query-pci.json", line)
        q.cmd("system_reset")
        time.sleep(0.5)
        q.cmd("query-status")
        for ev in q.events:
            name = json.loads(ev)["event"]
            save(outdir, "event-%s.json" % name, ev)
        q.cmd("quit")
        qemu.wait(10)
        # Without -name.
        qemu2 = subprocess.Popen([
            "qemu-system-x86_64", "-S", "-display", "none", "-accel", "tcg", "-nodefaults",
            "-qmp", "unix:%s,server=on,wait=off" % qmp_sock])
        procs.append(qemu2)
        time.sleep(0.3)
        q2 = Qmp(qmp_sock)
        q2.cmd("qmp_capabilities")
        save(outdir, "query-name-empty.json", q2.cmd("query-name"))
        q2.cmd("quit")
        qemu2.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for root, dirs, files in os.walk(tmp, topdown=False):
            for n in files:
                os.unlink(os.path.join(root, n))
            os.rmdir(root)


if __name__ == "__main__":
    main()
