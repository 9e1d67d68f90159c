#!/usr/bin/env python3
"""A fleet of fake QEMUs that replay one recorded QMP session.

One asyncio process serves COUNT VMs in DIR, each a distinct VM:

  DIR/qmp/vm<i>.sock    its QMP monitor: the recorded greeting, then for
                        every command the recorded reply (with the request's
                        id); a command that is not in the recording is
                        logged, counted and answered by closing the
                        connection (nothing that was not recorded is ever
                        sent, events included)
  DIR/agent/vm<i>.sock  every unix socket QEMU listened on in the recording
                        (the virtio-serial agent port's chardev): connections
                        are accepted and read, nothing is written, as QEMU
                        does for a guest that has not opened the port
  DIR/stats.sock        connect to it to read this process's counters (JSON)

Per VM the replies differ from the recording only where a real fleet's
would: the -name (vm<i>), the agent port's socket path in query-chardev,
and the vCPU thread-ids of query-cpus-fast (the VM's pid + the recorded
offset of the thread from QEMU's pid).

The VM's pid. vkickd takes it from SO_PEERCRED on the QMP socket, and for a
unix stream socket that is the process that called listen(). Each VM's QMP
socket is therefore created and listen()ed by a short-lived child of its own
(one fork per VM) and handed to this process over SCM_RIGHTS: every fake VM
has a distinct pid, as real QEMUs do. The children exit at once, so the pids
are those of exited processes (the kernel may hand them out again later;
the probes count nothing for these VMs either way: they run no vCPU).

  bench/scale/fake_qmp.py --dir=/tmp/fleet --count=1000
Prints "ready <count>" on stdout once every socket listens; stops on SIGTERM
or SIGINT. Also imported by record_qmp.py and run (request_key, the stats).
"""
import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys

DEFAULT_RECORDING = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "qmp_recording.json")


def request_key(req):
    """The identity of a QMP request: command and arguments, not its id."""
    key = {"execute": req.get("execute")}
    if req.get("arguments") is not None:
        key["arguments"] = req["arguments"]
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def raise_nofile(needed):
    """Raises RLIMIT_NOFILE (soft, and hard when root may) to at least `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            needed = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def read_stats(path, timeout=10.0):
    """The counters of a running fake_qmp (its stats.sock) as a dict."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


class Recording:
    """The fixture, with replies pre-serialised and per-VM substitutions."""

    def __init__(self, path):
        with open(path) as f:
            rec = json.load(f)
        self.greeting = (json.dumps(rec["greeting"]) + "\r\n").encode()
        subst = rec["substitutions"]
        self.name = subst["name"]
        self.qemu_pid = subst["pid"]
        # Recorded path -> its kind, per VM DIR/<kind>/vm<i>.sock ("agent"),
        # and the kinds of the sockets QEMU listened on (served here).
        self.paths = subst["paths"]
        self.serve = subst["serve"]
        self.replies = {}      # key -> reply text without its closing brace
        self.per_vm = set()    # keys whose reply depends on the VM
        for e in rec["exchanges"]:
            text = json.dumps(e["reply"])
            self.replies[e["key"]] = text[:-1]
            if ('"thread-id"' in text or json.dumps(self.name)[1:-1] in text or
                    any(p in text for p in self.paths)):
                self.per_vm.add(e["key"])

    def reply_for_vm(self, key, vm):
        """The reply text (without closing brace) of `key` for fake VM `vm`."""
        text = self.replies[key]
        if key not in self.per_vm:
            return text
        reply = json.loads(text + "}")

        def strings(v):
            if isinstance(v, dict):
                return {k: strings(x) for k, x in v.items()}
            if isinstance(v, list):
                return [strings(x) for x in v]
            if isinstance(v, str):
                if v == self.name:
                    return vm.name
                for recorded, suffix in self.paths.items():
                    v = v.replace(recorded, vm.socket(suffix))
            return v
        reply = strings(reply)
        # query-cpus-fast: a vCPU's thread-id is a thread of the VM's process.
        ret = reply.get("return")
        if isinstance(ret, list):
            for cpu in ret:
                if isinstance(cpu, dict) and isinstance(cpu.get("thread-id"), int):
                    cpu["thread-id"] += vm.pid - self.qemu_pid
        return json.dumps(reply)[:-1]


class Vm:
    def __init__(self, index, directory, pid):
        self.index = index
        self.name = "vm%d" % index
        self.directory = directory
        self.pid = pid
        self.cache = {}

    def socket(self, kind):
        """DIR/<kind>/vm<i>.sock: its QMP socket (kind "qmp"), agent port..."""
        return os.path.join(self.directory, kind, self.name + ".sock")


class Stats:
    def __init__(self):
        self.commands = {}          # execute -> count
        self.qmp_connections = 0    # accepted, total
        self.qmp_open = 0
        self.other_connections = 0  # the recorded chardev sockets
        self.other_open = 0
        self.unrecorded = 0
        self.unrecorded_examples = []

    def as_json(self, count):
        d = dict(self.__dict__)
        d["vms"] = count
        d["pid"] = os.getpid()
        return json.dumps(d).encode()


class QmpProtocol(asyncio.Protocol):
    def __init__(self, server, vm):
        self.server = server
        self.vm = vm
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport
        self.server.stats.qmp_connections += 1
        self.server.stats.qmp_open += 1
        transport.write(self.server.rec.greeting)

    def connection_lost(self, exc):
        self.server.stats.qmp_open -= 1

    def data_received(self, data):
        self.buf += data
        out = []
        unknown = False
        while (nl := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            if not line.strip():
                continue
            reply = self.server.answer(self.vm, line)
            if reply is None:
                unknown = True
                break
            out.append(reply)
        if out:
            self.transport.write(b"".join(out))
        if unknown:
            self.buf = b""
            self.transport.close()


class SinkProtocol(asyncio.Protocol):
    """A recorded chardev server socket: accepts and reads, never writes."""

    def __init__(self, stats):
        self.stats = stats

    def connection_made(self, transport):
        self.stats.other_connections += 1
        self.stats.other_open += 1

    def connection_lost(self, exc):
        self.stats.other_open -= 1

    def data_received(self, data):
        pass


class FakeFleet:
    def __init__(self, rec, directory, count):
        self.rec = rec
        self.directory = directory
        self.count = count
        self.stats = Stats()

    def answer(self, vm, line):
        stats = self.stats
        try:
            req = json.loads(line)
            key = request_key(req)
        except (ValueError, AttributeError):
            req, key = None, None
        if key is None or key not in self.rec.replies:
            stats.unrecorded += 1
            if len(stats.unrecorded_examples) < 10:
                stats.unrecorded_examples.append(line.decode(errors="replace")[:200])
            print("fake_qmp: %s: not in the recording, closing: %s" %
                  (vm.name, line.decode(errors="replace")[:200]), file=sys.stderr, flush=True)
            return None
        name = req["execute"]
        stats.commands[name] = stats.commands.get(name, 0) + 1
        text = vm.cache.get(key)
        if text is None:
            text = self.rec.reply_for_vm(key, vm)
            if key in self.rec.per_vm:
                vm.cache[key] = text
        if "id" in req:
            return ("%s, \"id\": %s}\r\n" % (text, json.dumps(req["id"]))).encode()
        return (text + "}\r\n").encode()

    def make_listeners(self, progress):
        """(vm, qmp listening socket) per VM, each listen()ed by its own child."""
        parent, child = socket.socketpair()
        out = []
        try:
            for i in range(self.count):
                vm = Vm(i, self.directory, 0)
                path = vm.socket("qmp")
                if os.path.exists(path):
                    os.unlink(path)
                pid = os.fork()
                if pid == 0:
                    try:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.bind(path)
                        s.listen(64)
                        socket.send_fds(child, [b"x"], [s.fileno()])
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)
                _, fds, _, _ = socket.recv_fds(parent, 1, 1)
                if not fds:
                    raise RuntimeError("child for %s sent no socket" % path)
                vm.pid = pid
                out.append((vm, socket.socket(fileno=fds[0])))
                if progress and (i + 1) % 500 == 0:
                    print("fake_qmp: %d/%d sockets" % (i + 1, self.count),
                          file=sys.stderr, flush=True)
        finally:
            parent.close()
            child.close()
        pids = {vm.pid for vm, _ in out}
        if len(pids) != len(out):
            print("fake_qmp: warning: %d VMs share a pid (pid numbers wrapped)" %
                  (len(out) - len(pids)), file=sys.stderr, flush=True)
        return out

    async def serve(self, progress):
        loop = asyncio.get_running_loop()
        servers = []
        listeners = []
        for vm, sock in self.make_listeners(progress):
            # Not loop.create_unix_server(sock=...): it calls listen() again,
            # and a second listen() makes this process the socket's SO_PEERCRED.
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self.accept, loop, sock, vm)
            listeners.append(sock)
            for suffix in self.rec.serve:
                path = vm.socket(suffix)
                if os.path.exists(path):
                    os.unlink(path)
                servers.append(await loop.create_unix_server(
                    lambda: SinkProtocol(self.stats), path=path, backlog=64))

        async def stats_conn(reader, writer):
            writer.write(self.stats.as_json(self.count))
            await writer.drain()
            writer.close()
        stats_path = os.path.join(self.directory, "stats.sock")
        if os.path.exists(stats_path):
            os.unlink(stats_path)
        servers.append(await asyncio.start_unix_server(stats_conn, path=stats_path))

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready %d" % self.count, flush=True)
        await stop.wait()
        for s in servers:
            s.close()
        for s in listeners:
            loop.remove_reader(s.fileno())
            s.close()

    def accept(self, loop, sock, vm):
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE...: leave it queued, say why
                print("fake_qmp: %s: accept: %s" % (vm.name, e), file=sys.stderr, flush=True)
                return
            conn.setblocking(False)
            loop.create_task(loop.connect_accepted_socket(lambda: QmpProtocol(self, vm), conn))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--dir", required=True, help="directory for the sockets (short path)")
    ap.add_argument("--count", type=int, required=True, help="number of VMs")
    ap.add_argument("--recording", default=DEFAULT_RECORDING)
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args()
    rec = Recording(args.recording)
    for kind in ["qmp"] + rec.serve:
        os.makedirs(os.path.join(args.dir, kind), exist_ok=True)
    # Per VM: a QMP listener and connection, and per recorded chardev socket
    # a listener and a connection.
    raise_nofile(args.count * 2 * (1 + len(rec.serve)) + 256)
    asyncio.run(FakeFleet(rec, args.dir, args.count).serve(not args.quiet))


if __name__ == "__main__":
    main()
