"""A real Prometheus server (Debian's `prometheus`) on loopback, scraping
vkickd, with vkick's recording and alert rules loaded."""

import json
import os
import shutil
import urllib.parse
import urllib.request

from .util import Fatal, free_port, log, skip, source_dir, wait_until


def prometheus_binary():
    p = shutil.which("prometheus")
    if not p:
        skip("prometheus is not installed (Debian package prometheus; scripts/setup.sh installs it)")
    return p


class Prometheus:
    def __init__(self, tb, targets, scrape_interval="1s", rules=True):
        self.tb = tb
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        cfgdir = tb.path("prometheus")
        os.makedirs(cfgdir, exist_ok=True)
        rule_files = []
        if rules:
            # The rules exactly as shipped (deploy/prometheus), not a copy
            # written for the test: what is tested is what operators install.
            for name in ("vkick-recording.rules.yml", "vkick-alerts.rules.yml"):
                shutil.copy(os.path.join(source_dir(), "deploy", "prometheus", name), cfgdir)
                rule_files.append(name)
        cfg = ["global:",
               "  scrape_interval: %s" % scrape_interval,
               "  evaluation_interval: %s" % scrape_interval,
               "rule_files:"] + ["  - %s" % r for r in rule_files] + [
               "scrape_configs:",
               "  - job_name: vkickd",
               "    scrape_interval: %s" % scrape_interval,
               "    scrape_timeout: %s" % scrape_interval,
               "    static_configs:",
               "      - targets: [%s]" % ", ".join('"%s"' % t for t in targets)]
        if not rule_files:
            cfg.remove("rule_files:")
        self.config = os.path.join(cfgdir, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write("\n".join(cfg) + "\n")
        argv = [prometheus_binary(), "--config.file=" + self.config,
                "--storage.tsdb.path=" + os.path.join(cfgdir, "data"),
                "--web.listen-address=127.0.0.1:%d" % self.port,
                "--log.level=warn"]
        self.proc = tb.spawn("prometheus", argv)
        wait_until(self._ready, 60, "prometheus /-/ready on %s" % self.url, interval=0.3)
        log("prometheus ready on", self.url)

    def _ready(self):
        if not self.proc.alive():
            raise Fatal("prometheus exited (rc %s):\n%s" % (self.proc.returncode(),
                                                             self.proc.tail()))
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = self.url + "/api/v1/" + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise AssertionError("prometheus %s: %r" % (path, body))
        return body["data"]

    def query(self, expr, time=None):
        """Instant query -> [(labels, float)]."""
        params = {"query": expr}
        if time is not None:
            params["time"] = "%.3f" % time
        data = self.api("query", **params)
        if data["resultType"] != "vector":
            raise AssertionError("expected a vector for %r, got %r" % (expr, data))
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def scrapes_of(self, job="vkickd"):
        """How many scrapes of `job` Prometheus has stored so far."""
        r = self.query('count_over_time(up{job="%s"}[1h])' % job)
        return int(r[0][1]) if r else 0
