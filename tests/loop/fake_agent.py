"""A fake vkick-agent speaking the channel protocol of docs/protocol.md
(stdlib only). It connects to vkickd's --agent-socket, says hello for its
devices, applies every policy it receives (just records it), acks it, and
sends a sample every `period` seconds at the queue depth the test sets. It
reconnects on its own when the connection breaks (vkickd killed/restarted).

Also the raw helpers the hostile-agent checks use (frame, hello, sample)."""

import socket
import struct
import threading
import time

MAGIC = b"VKCK"
T_HELLO, T_SAMPLE, T_POLICY, T_ACK, T_ERROR, T_BYE = 1, 2, 3, 4, 5, 6
MODES = {0: "immediate", 1: "event-idx", 2: "static", 3: "adaptive"}


VERSION = 3  # protocol/messages.h kVersion


def frame(mtype, payload, version=VERSION, length=None):
    n = len(payload) if length is None else length
    return MAGIC + struct.pack("<HHI", version, mtype, n) + payload


def str8(s):
    b = s.encode()
    return struct.pack("<B", len(b)) + b


def hello(agent_id, devices, driver=0):
    """devices: [(serial, num_queues)]; host-process devices get distinct
    fake PCI devfns (the protocol refuses two entries at one PCI function).
    driver: 0 vkick-blk, 1 the kernel's virtio_blk (observed only)."""
    p = str8(agent_id) + str8("6.18-fake") + struct.pack("<H", len(devices))
    for i, (serial, nq) in enumerate(devices):
        p += struct.pack("<HBB", 0, 0, i) + str8(serial) + struct.pack("<HHBB", nq, 256, driver, 0)
    return frame(T_HELLO, p)


def depth_bucket(d):
    if d <= 1:
        return 0
    if d >= 512:
        return 9
    return d.bit_length() - 1


def queue_sample(dev, q, depth, requests, applied, interval_ns=500_000_000, **override):
    """One 292-byte queue sample at constant depth; kicks = requests / B
    (event-idx: every batch is put to the device, which wants a kick for
    each, as a device that sleeps would)."""
    mode, batch, defer, gen = applied
    batch = batch if mode in (1, 2, 3) else 1
    kicks = (requests + batch - 1) // batch if requests else 0
    dh = [0] * 10
    lh = [0] * 16
    if requests:
        dh[depth_bucket(depth)] = requests
        lh[7] = requests  # 64..128 us
    asks = kicks if mode == 1 else 0
    f = dict(interval_ns=interval_ns, requests=requests, kicks=kicks, timer_kicks=0,
             completed=requests, asks=asks, suppressed=0, mean_milli=depth * 1000 if requests else 0,
             max_depth=depth if requests else 0, lease=1 if gen else 0,
             mode=mode if gen else 0, batch=batch if gen else 1, defer=defer if gen else 0,
             gen=gen)
    f.update(override)
    b = struct.pack("<HH", dev, q)
    b += struct.pack("<7Q", f["interval_ns"], f["requests"], f["kicks"], f["timer_kicks"],
                     f["completed"], f["asks"], f["suppressed"])
    b += struct.pack("<10Q", *dh) + struct.pack("<16Q", *lh)
    b += struct.pack("<IHBBHHIQ", f["mean_milli"], f["max_depth"], f["lease"], f["mode"],
                     f["batch"], 0, f["defer"], f["gen"])
    assert len(b) == 292
    return b


def sample(seq, queues):
    return frame(T_SAMPLE, struct.pack("<QHH", seq, len(queues), 0) + b"".join(queues))


def ack(gen):
    return frame(T_ACK, struct.pack("<Q", gen))


def parse_policy(payload):
    n, _ = struct.unpack_from("<HH", payload, 0)
    out = []
    for i in range(n):
        dev, q, mode, _, batch, defer, lease, gen = struct.unpack_from(
            "<HHBBHIQQ", payload, 4 + 28 * i)
        out.append(dict(dev=dev, queue=q, mode=MODES.get(mode, mode), batch=batch,
                        defer_ns=defer, lease_ns=lease, generation=gen))
    return out


class FakeAgent:
    def __init__(self, path, devices, period=0.25, depth=1, rate=4000):
        self.path = path
        self.devices = devices
        self.period = period
        self.depth = depth
        self.rate = rate  # requests per second per queue
        self.lock = threading.Lock()
        self.policies = {}     # (dev, q) -> latest policy dict
        self.received = []     # (monotonic time, policy dict)
        self.connects = 0
        self.closed_by_peer = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def stop(self):
        self._stop = True
        self._t.join(5)

    def policy(self, dev=0, q=0):
        with self.lock:
            return self.policies.get((dev, q))

    def _applied(self, dev, q):
        p = self.policy(dev, q)
        if not p:
            return (0, 1, 0, 0)
        m = {v: k for k, v in MODES.items()}[p["mode"]]
        return (m, p["batch"], p["defer_ns"], p["generation"])

    def _run(self):
        while not self._stop:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.path)
            except OSError:
                time.sleep(0.1)
                continue
            with self.lock:
                self.connects += 1
            try:
                self._session(s)
            except OSError:
                pass
            finally:
                s.close()
            time.sleep(0.1)

    def _session(self, s):
        s.sendall(hello("fake-agent", self.devices))
        s.settimeout(0.05)
        buf = b""
        seq = 0
        next_sample = time.monotonic() + self.period
        while not self._stop:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    with self.lock:
                        self.closed_by_peer += 1
                    return
                buf += chunk
            except socket.timeout:
                pass
            while len(buf) >= 12:
                assert buf[:4] == MAGIC, "vkickd sent a bad frame"
                _, mtype, n = struct.unpack_from("<HHI", buf, 4)
                if len(buf) < 12 + n:
                    break
                payload, buf = buf[12:12 + n], buf[12 + n:]
                if mtype == T_POLICY:
                    pols = parse_policy(payload)
                    now = time.monotonic()
                    with self.lock:
                        for p in pols:
                            self.policies[(p["dev"], p["queue"])] = p
                            self.received.append((now, p))
                        del self.received[:-2000]
                    s.sendall(ack(max(p["generation"] for p in pols)))
            if time.monotonic() >= next_sample:
                next_sample += self.period
                seq += 1
                n = int(self.rate * self.period)
                qs = [queue_sample(d, q, self.depth, n, self._applied(d, q),
                                   interval_ns=int(self.period * 1e9))
                      for d, (_, nq) in enumerate(self.devices) for q in range(nq)]
                s.sendall(sample(seq, qs))
