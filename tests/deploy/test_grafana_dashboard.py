#!/usr/bin/env python3
"""Schema check of deploy/grafana (Python 3 stdlib; promtool for PromQL).

- vkick-dashboard.json is what gen_dashboard.py generates (no hand edits drift);
- the dashboard model has what Grafana's file provisioning needs: uid, title,
  schemaVersion, panels, templating, annotations; unique panel ids; every panel
  a gridPos inside the 24-column grid, no two panels overlapping; every
  non-row panel a datasource and targets, each with an expr;
- every metric an expr uses is in docs/metrics.md (histograms with their
  _bucket/_sum/_count series) or is a recording rule of deploy/prometheus;
- every expr parses as PromQL: the exprs (Grafana variables substituted) are
  written as recording rules into a temporary file checked by `promtool check
  rules` (promtool 2.42 has no stand-alone expression checker);
- the templating has vm/device/queue variables and an annotation on policy
  switches; the provisioning YAML files name the dashboard path and a
  Prometheus datasource.
"""
import json, os, re, shutil, subprocess, sys, tempfile

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
G = os.path.join(SRC, "deploy/grafana")

# The metric names come from docs/metrics.md (checked against the exporter's code
# by tests/unit/exporters metrics_doc_test) and the recording rules of
# deploy/prometheus: no list of names here that could drift.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "changes", "resets", "histogram_quantile", "absent", "absent_over_time", "label_values",
    "max_over_time", "min_over_time", "avg_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "clamp_min", "clamp_max", "abs", "vector", "scalar", "time", "inf", "nan",
}

errors = []


def err(msg):
    errors.append(msg)


def known_metrics():
    names = set()
    doc = os.path.join(SRC, "docs/metrics.md")
    for m in re.findall(r"^\|\s*`(vkick_[a-z0-9_]+)`\s*\|\s*(\w+)", open(doc).read(), re.M):
        names.add(m[0])
        if m[1] == "histogram":
            names |= {m[0] + "_bucket", m[0] + "_sum", m[0] + "_count"}
    if not names:
        err("docs/metrics.md lists no metrics (table format changed?)")
    prom = os.path.join(SRC, "deploy/prometheus")
    for f in os.listdir(prom):
        if f.endswith(".rules.yml"):
            names |= set(re.findall(r"^\s*-\s*record:\s*(\S+)", open(os.path.join(prom, f)).read(), re.M))
    return names


def substitute(expr):
    """Grafana variables -> values Prometheus accepts."""
    e = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", e)


def metrics_in(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings
    e = re.sub(r"\{[^}]*\}", "", e)                               # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                              # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        if re.fullmatch(r"\d[\w.]*", word):
            continue
        out.add(word)
    return out


def main():
    if subprocess.run([sys.executable, os.path.join(G, "gen_dashboard.py"), "--check"]).returncode:
        err("vkick-dashboard.json differs from gen_dashboard.py output (run the generator)")
    try:
        d = json.load(open(os.path.join(G, "vkick-dashboard.json")))
    except ValueError as e:
        print(f"FAIL: dashboard is not valid JSON: {e}")
        return 1
    for k, t in [("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                 ("templating", dict), ("annotations", dict)]:
        if not isinstance(d.get(k), t):
            err(f"dashboard: key {k} missing or not {t.__name__}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d.get("uid", "")):
        err("dashboard uid must be 1..40 of [A-Za-z0-9_-]")
    if d.get("schemaVersion", 0) < 36:
        err("schemaVersion < 36 (Grafana 9+ expected)")
    known = known_metrics()
    exprs = []  # (where, expr)
    ids, cells = set(), {}
    for p in d.get("panels", []):
        where = f"panel {p.get('id')} '{p.get('title')}'"
        if not isinstance(p.get("id"), int) or p["id"] in ids:
            err(f"{where}: id missing or duplicate")
        ids.add(p.get("id"))
        gp = p.get("gridPos", {})
        if not all(isinstance(gp.get(k), int) for k in "xywh") or gp["x"] < 0 or gp["w"] < 1 \
                or gp["x"] + gp["w"] > 24 or gp["h"] < 1:
            err(f"{where}: bad gridPos {gp}")
        else:
            for x in range(gp["x"], gp["x"] + gp["w"]):
                for y in range(gp["y"], gp["y"] + gp["h"]):
                    if (x, y) in cells:
                        err(f"{where}: overlaps {cells[(x, y)]}")
                        break
                    cells[(x, y)] = where
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            err(f"{where}: no title")
        ds = p.get("datasource") or {}
        if ds.get("type") != "prometheus" or not ds.get("uid"):
            err(f"{where}: datasource must be a prometheus datasource with a uid, got {ds}")
        if not p.get("targets"):
            err(f"{where}: no targets")
        for t in p.get("targets", []):
            if not t.get("expr") or not t.get("refId"):
                err(f"{where}: target without expr/refId")
            else:
                exprs.append((where, t["expr"]))
    tl = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    for v in ("datasource", "vm", "device", "queue"):
        if v not in tl:
            err(f"templating: variable {v} missing")
    for v in ("vm", "device", "queue"):
        q = tl.get(v, {}).get("query", {})
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q or "")
        if not m or m.group(2) != v:
            err(f"templating: {v} is not label_values(..., {v}): {q}")
        else:
            exprs.append((f"variable {v}", m.group(1)))
    ann = [a for a in d.get("annotations", {}).get("list", []) if a.get("expr")]
    if not any("vkick_policy_switches_total" in a["expr"] for a in ann):
        err("annotations: no annotation on policy switches (vkick_policy_switches_total)")
    exprs += [(f"annotation {a.get('name')}", a["expr"]) for a in ann]
    # Every panel selecting virtqueue series honours the variables.
    for where, e in exprs:
        unknown = metrics_in(e) - known
        if unknown:
            err(f"{where}: unknown metric(s) {sorted(unknown)} in {e}")
    # Issue 5: per VM / queue notifications per request, depth, latency, policy (mode), B, T.
    for must in ("vkick:virtqueue_notifications_per_request:rate1m", "vkick_queue_policy_info",
                 "vkick_queue_batch_threshold", "vkick_queue_defer_bound_seconds",
                 "vkick_virtqueue_depth_bucket", "vkick:virtqueue_request_latency_seconds:p99_rate1m",
                 "vkick:virtqueue_requests:rate1m", "vkick:virtqueue_notifications:rate1m"):
        if not any(must in e for _, e in exprs):
            err(f"no panel shows {must}")

    # PromQL syntax through promtool.
    if shutil.which("promtool"):
        with tempfile.TemporaryDirectory(prefix="vkick-dash-") as tmp:
            f = os.path.join(tmp, "exprs.rules.yml")
            with open(f, "w") as out:
                out.write("groups:\n  - name: dashboard\n    rules:\n")
                for i, (where, e) in enumerate(exprs):
                    out.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(substitute(e))}\n")
            r = subprocess.run(["promtool", "check", "rules", f], capture_output=True, text=True)
            if r.returncode:
                err("promtool check of the dashboard's exprs failed:\n" + r.stdout + r.stderr)
            else:
                print(f"promtool: {len(exprs)} dashboard exprs parse")
    else:
        print("note: promtool missing, PromQL syntax not checked")

    # Provisioning files (no YAML parser in the stdlib: check the keys textually).
    dsy = open(os.path.join(G, "provisioning/datasources/vkick-prometheus.yaml")).read()
    for k in ("apiVersion: 1", "type: prometheus", "url: "):
        if k not in dsy:
            err(f"datasource provisioning: '{k}' missing")
    dby = open(os.path.join(G, "provisioning/dashboards/vkick.yaml")).read()
    for k in ("apiVersion: 1", "type: file", "path: "):
        if k not in dby:
            err(f"dashboard provisioning: '{k}' missing")

    if errors:
        print("FAIL:", *errors, sep="\n  ")
        return 1
    print(f"OK: {len(d['panels'])} panels, {len(exprs)} exprs, all metrics known")
    return 0


if __name__ == "__main__":
    sys.exit(main())
