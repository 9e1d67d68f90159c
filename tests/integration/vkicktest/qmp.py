"""A minimal QMP client (QEMU Machine Protocol over a unix socket)."""

import json
import socket
import time


class QmpError(Exception):
    pass


class QmpClient:
    def __init__(self, path, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self.events = []
        self._buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        greeting = self._read_msg()
        if "QMP" not in greeting:
            raise QmpError("no QMP greeting on %s: %r" % (path, greeting))
        self.greeting = greeting
        self.execute("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _read_msg(self):
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QMP socket %s closed" % self.path)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            r = self._read_msg()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError("%s: %s" % (cmd, r["error"]))
            return r.get("return")
        raise QmpError("%s: no reply within %.1fs" % (cmd, self.timeout))
