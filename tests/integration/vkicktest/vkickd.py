"""vkickd under test: started with --qmp paths and a free loopback port."""

from .metrics import http_get, scrape
from .util import Fatal, free_port, log, vkickd_path, wait_until


class Vkickd:
    def __init__(self, tb, qmp_paths, refresh="1s", extra=()):
        self.tb = tb
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        # The tests check exact host counts of every kind of kick, also the
        # write() kicks of vhost-user frontends (off by default: a cost on
        # every syscall of the host, docs/probes.md).
        argv = [vkickd_path()] + ["--qmp=%s" % p for p in qmp_paths] + [
            "--listen=127.0.0.1:%d" % self.port, "--refresh-interval=%s" % refresh,
            "--vhost-user-kicks"] + list(extra)
        self.proc = tb.spawn("vkickd", argv)
        wait_until(self._healthy, 30, "vkickd /healthz on %s" % self.url, interval=0.2)

    def _healthy(self):
        if not self.proc.alive():
            raise Fatal("vkickd exited (rc %s):\n%s" % (self.proc.returncode(),
                                                                self.proc.tail()))
        status, body = http_get(self.url + "/healthz", timeout=2)
        return status == 200 and body.strip() == "ok"

    def metrics(self):
        if not self.proc.alive():
            raise Fatal("vkickd died (rc %s):\n%s" % (self.proc.returncode(),
                                                              self.proc.tail()))
        return scrape(self.url + "/metrics")

    def wait_metric(self, what, pred, timeout=30, interval=0.25):
        """Scrape until pred(metrics) is truthy; returns its value."""
        return wait_until(lambda: pred(self.metrics()), timeout, what, interval=interval)

    def wait_vm(self, vm, pid, timeout=30):
        return self.wait_metric(
            "vkick_vm_info{vm=%r,pid=%r} == 1" % (vm, str(pid)),
            lambda m: m.value("vkick_vm_info", vm=vm, pid=str(pid)) == 1, timeout)

    def queue_counts(self, m, vm):
        """{(device, queue): count} of every notification series of `vm`.
        queue is an int, or the string "unknown" for vkickd's catch-all
        series (kicks for ids discovery does not know: docs/metrics.md)."""
        def q(v):
            return int(v) if v is not None and v.isdigit() else v
        return {(l.get("device"), q(l.get("queue"))): v
                for l, v in m.select("vkick_virtqueue_notifications_total", vm=vm)}
