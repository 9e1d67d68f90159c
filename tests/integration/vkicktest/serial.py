"""The guest's COM1, as a QEMU unix-socket chardev: read lines, send bytes."""

import socket
import threading
import time


class SerialConsole:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.sock.settimeout(None)
        self._data = b""
        self._cv = threading.Condition()
        self._closed = False
        self._t = threading.Thread(target=self._reader, daemon=True)
        self._t.start()

    def _reader(self):
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            with self._cv:
                if not chunk:
                    self._closed = True
                    self._cv.notify_all()
                    return
                self._data += chunk
                self._cv.notify_all()

    def text(self):
        with self._cv:
            return self._data.decode("utf-8", "replace")

    def wait_for(self, needle, timeout):
        """Wait until the output contains `needle`; returns the output."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while needle.encode() not in self._data:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise AssertionError("guest serial: no %r within %.1fs%s; output so far:\n%s" % (
                        needle, timeout, " (console closed)" if self._closed else "",
                        self._data.decode("utf-8", "replace")))
                self._cv.wait(left)
            return self._data.decode("utf-8", "replace")

    def count(self, needle):
        with self._cv:
            return self._data.count(needle.encode())

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
