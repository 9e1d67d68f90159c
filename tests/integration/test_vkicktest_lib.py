#!/usr/bin/env python3
"""Unit checks of the test library itself (no root, no QEMU): the
Prometheus text parser, the fake QMP servers, free-port picking, wait_until."""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vkicktest import (Testbed, parse_metrics, Metrics, ParseError, free_port, wait_until,
                       Timeout, run_test)
from vkicktest.flows import FakeQmpServer, plan_append

TEXT = r'''# HELP vkick_virtqueue_notifications_total Guest notifications.
# TYPE vkick_virtqueue_notifications_total counter
vkick_virtqueue_notifications_total{vm="a",device="modern0",queue="0"} 3000
vkick_virtqueue_notifications_total{vm="a",device="0000:00:04.0",queue="1"} 1e3
vkick_vm_info{vm="q\"uote\\d",pid="42"} 1
vkick_up 1 1700000000000
'''


def main():
    m = Metrics(parse_metrics(TEXT))
    assert m.value("vkick_virtqueue_notifications_total", device="modern0", queue=0) == 3000
    assert m.value("vkick_virtqueue_notifications_total", device="0000:00:04.0") == 1000
    assert m.value("vkick_vm_info", vm='q"uote\\d', pid=42) == 1
    assert m.value("vkick_up") == 1
    assert m.value("vkick_virtqueue_notifications_total", device="nope") is None
    for bad in ['x{a="b"', 'x{a=b} 1', 'x 1 2 3', '1x 2', 'x{a="b"} notanumber']:
        try:
            parse_metrics(bad)
        except ParseError:
            continue
        raise AssertionError("parsed invalid line %r" % bad)
    assert plan_append([(4, [1, 2]), (0x1f, [3])], "go=serial") == "dev=4:1,2 dev=1f:3 go=serial"

    p = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))
    t0 = time.monotonic()
    try:
        wait_until(lambda: False, 0.3, "never")
        raise AssertionError("wait_until did not time out")
    except Timeout:
        assert time.monotonic() - t0 >= 0.3

    with Testbed("lib") as tb:
        tmp = tb.tmp
        g = FakeQmpServer(tb, tb.path("g.sock"), "garbage")
        s = FakeQmpServer(tb, tb.path("s.sock"), "silent")
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(g.path)
        assert not c.recv(100).startswith(b'{"QMP"')
        c.close()
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(0.5)
        c.connect(s.path)
        try:
            c.recv(100)
            raise AssertionError("silent server spoke")
        except socket.timeout:
            pass
        c.close()
    assert not os.path.exists(tmp), "testbed temp dir not removed"


if __name__ == "__main__":
    run_test(main)
