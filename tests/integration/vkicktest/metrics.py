"""Scrape and parse the Prometheus text exposition format (0.0.4)."""

import re
import urllib.request

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


class ParseError(ValueError):
    pass


def _unescape(v):
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse(text):
    """Returns a list of (name, labels: dict, value: float). Raises
    ParseError on a line that is not valid exposition format."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ParseError("line %d: %r" % (n, line))
        name, _, body, value, _ts = m.groups()
        labels = {}
        if body:
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if not lm:
                    raise ParseError("line %d: bad labels %r" % (n, body))
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
        try:
            v = float(value)
        except ValueError:
            raise ParseError("line %d: bad value %r" % (n, value))
        out.append((name, labels, v))
    return out


class Metrics:
    """One scrape: query samples by name and a label subset."""

    def __init__(self, samples, text=""):
        self.samples = samples
        self.text = text

    def select(self, name, **labels):
        return [(l, v) for (n, l, v) in self.samples
                if n == name and all(l.get(k) == str(want) for k, want in labels.items())]

    def value(self, name, **labels):
        """The value of the single matching series, or None if absent."""
        s = self.select(name, **labels)
        if len(s) > 1:
            raise AssertionError("%d series match %s%r" % (len(s), name, labels))
        return s[0][1] if s else None

    def names(self):
        return sorted({n for (n, _, _) in self.samples})


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def scrape(url, timeout=5.0):
    status, text = http_get(url, timeout)
    if status != 200:
        raise AssertionError("GET %s: HTTP %d" % (url, status))
    return Metrics(parse(text), text)
