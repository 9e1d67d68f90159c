#!/usr/bin/env python3
"""No metric name drift between what vkickd exports and what deploy/ uses.

docs/metrics.md is the list of metrics vkickd exports (its table is checked
against exporters/metrics_table.cc by tests/unit/exporters metrics_doc_test).
This test extracts every metric name used in

  - deploy/ (recording and alert rules, prometheus.yml, the dashboard JSON and
    its generator, provisioning, systemd, Kubernetes, libvirt files),
  - tests/deploy/rules_test.yml (the input series of the rule unit tests),
  - docs/operations.md and README.md,

and fails for any that is not
  - a metric of docs/metrics.md, or a histogram's _bucket/_sum/_count series,
  - a `vkick:level:ops` recording rule defined in deploy/prometheus/*.rules.yml.
A name written as a prefix (`vkick_queue_*`) must be the prefix of a listed
metric. It also checks that every alert and recording rule is unit-tested in
rules_test.yml and that every alert is documented in docs/operations.md.
Python 3 standard library only.
"""
import os, re, sys

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
METRIC = re.compile(r"\bvkick_[a-z0-9_]+\*?")
# Recording rules follow level:metric:operations, so "vkick:vkick" (user:group)
# or "vkick: virtio kicks" (a title) are not taken for one.
# Names that look like metrics and are not: the guest kernel driver's module
# (and its CMake target).
NOT_METRICS = {"vkick_virtio_blk", "vkick_virtio_blk_ko"}
RULE = re.compile(r"\bvkick:[a-z0-9_]+:[a-z0-9_:]*[a-z0-9_]")
TEXT_EXT = (".yml", ".yaml", ".json", ".py", ".md", ".service", ".sysusers", ".tmpfiles",
            ".example", ".xml", ".conf", ".txt", ".sh")


def exported():
    doc = open(os.path.join(SRC, "docs/metrics.md")).read()
    rows = re.findall(r"^\|\s*`(vkick_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|", doc, re.M)
    names, base = set(), set()
    for name, kind in rows:
        base.add(name)
        names.add(name)
        if kind == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count")}
    return base, names


def rules():
    prom = os.path.join(SRC, "deploy/prometheus")
    records, alerts = set(), set()
    for f in sorted(os.listdir(prom)):
        if f.endswith(".rules.yml"):
            t = open(os.path.join(prom, f)).read()
            records |= set(re.findall(r"^\s*-\s*record:\s*(\S+)", t, re.M))
            alerts |= set(re.findall(r"^\s*-\s*alert:\s*(\S+)", t, re.M))
    return records, alerts


def files():
    out = []
    for root, _, fs in os.walk(os.path.join(SRC, "deploy")):
        for f in sorted(fs):
            if f.endswith(TEXT_EXT) or "." not in f:
                out.append(os.path.join(root, f))
    out += [os.path.join(SRC, p) for p in ("tests/deploy/rules_test.yml", "docs/operations.md",
                                           "README.md")]
    return out


def main():
    errors = []
    base, known = exported()
    if len(base) < 10:
        print(f"FAIL: docs/metrics.md lists only {len(base)} metrics: table format changed?")
        return 1
    records, alerts = rules()
    seen = 0
    for path in files():
        rel = os.path.relpath(path, SRC)
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError) as e:
            errors.append(f"{rel}: cannot read: {e}")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for m in METRIC.finditer(line):
                name = m.group(0)
                if name in NOT_METRICS:
                    continue
                seen += 1
                if name.endswith("*") or name.endswith("_"):
                    prefix = name.rstrip("*")
                    if not any(k.startswith(prefix) for k in base):
                        errors.append(f"{rel}:{n}: no metric of docs/metrics.md starts with {prefix}")
                elif name not in known:
                    errors.append(f"{rel}:{n}: {name} is not exported by vkickd (docs/metrics.md)")
            for m in RULE.finditer(line):
                seen += 1
                if m.group(0) not in records:
                    errors.append(f"{rel}:{n}: {m.group(0)} is no recording rule of deploy/prometheus")

    # Every rule is unit-tested, every alert documented.
    tests = open(os.path.join(SRC, "tests/deploy/rules_test.yml")).read()
    tested_alerts = set(re.findall(r"alertname:\s*(\S+)", tests))
    test_exprs = "\n".join(re.findall(r"-\s*expr:\s*(.*)", tests))
    ops = open(os.path.join(SRC, "docs/operations.md")).read()
    for a in sorted(alerts):
        if a not in tested_alerts:
            errors.append(f"alert {a} has no alert_rule_test in tests/deploy/rules_test.yml")
        if f"`{a}`" not in ops:
            errors.append(f"alert {a} is not documented in docs/operations.md")
    for r in sorted(records):
        if r not in test_exprs:
            errors.append(f"recording rule {r} has no promql_expr_test in tests/deploy/rules_test.yml")
        if f"`{r}`" not in ops:
            errors.append(f"recording rule {r} is not documented in docs/operations.md")
    for a in sorted(tested_alerts - alerts):
        errors.append(f"rules_test.yml tests alert {a}, which deploy/prometheus does not define")

    if errors:
        print("FAIL:", *errors, sep="\n  ")
        return 1
    print(f"OK: {seen} metric/rule names in deploy/, rules_test.yml, operations.md and README.md "
          f"match docs/metrics.md ({len(base)} metrics) and the {len(records)} recording rules; "
          f"{len(alerts)} alerts and {len(records)} recording rules tested and documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
