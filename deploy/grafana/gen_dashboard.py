#!/usr/bin/env python3
"""Generates deploy/grafana/vkick-dashboard.json (Grafana dashboard model).

    python3 deploy/grafana/gen_dashboard.py            # rewrite the JSON
    python3 deploy/grafana/gen_dashboard.py --check    # exit 1 if it is stale

Edit this file, not the JSON: tests/deploy/test_grafana_dashboard.py fails when
the JSON differs from what this script prints. Python 3 standard library only.

The dashboard works both when provisioned from a file (deploy/grafana/provisioning/)
and when imported through the UI: every panel's datasource is the dashboard
variable ${datasource} (type prometheus), not a fixed uid.
"""
import json
import os
import sys

UID = "vkick-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
# Selector of the virtqueue series the variables choose.
Q = 'vm=~"$vm",device=~"$device",queue=~"$queue"'
V = 'vm=~"$vm"'
QLEG = "{{vm}} {{device}} q{{queue}}"
# Values of the mode / state labels (docs/metrics.md), mapped to numbers for state timelines.
MODES = ["immediate", "event-idx", "static", "adaptive"]
MODE_COLORS = ["blue", "purple", "yellow", "green"]
LEASE_STATES = ["none", "active", "expired"]


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self):
        self.x, self.y, self.row_h, self.next_id = 0, 0, 0, 1
        self.panels = []

    def row(self, title):
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel, w=12, h=8):
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i


def target(expr, legend="", ref="A", **extra):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}
    t.update(extra)
    return t


def panel(kind, title, description, targets, unit="short", **extra):
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                     "tooltip": {"mode": "multi", "sort": "desc"}}}
    p.update(extra)
    return p


def timeseries(title, description, targets, unit="short", **extra):
    return panel("timeseries", title, description, targets, unit, **extra)


def query_var(name, label, query, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "sort": 3, "multi": multi, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": ""}


def build():
    L = Layout()

    L.row("Overview")
    L.add(panel("stat", "Attached VMs", "VMs vkickd is attached to (vkick_vm_info).",
                [target("count(vkick_vm_info)", "VMs")],
                options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                         "colorMode": "value", "graphMode": "none", "textMode": "auto"}), w=6, h=4)
    L.add(panel("stat", "Probes attached", "1 when the eBPF host probes are attached and readable.",
                [target("min(vkick_probes_attached)", "attached")],
                options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                         "colorMode": "background", "graphMode": "none", "textMode": "auto"},
                fieldConfig={"defaults": {"unit": "short", "mappings": [
                    {"type": "value", "options": {"0": {"text": "no", "color": "red"},
                                                  "1": {"text": "yes", "color": "green"}}}]},
                             "overrides": []}), w=6, h=4)
    L.add(panel("stat", "Kicks per request (selected queues)",
                "Notifications per request over the selected queues; target < 0.1 at QD >= 32.",
                [target(f"sum(vkick:virtqueue_notifications:rate1m{{{Q}}}) / "
                        f"sum(vkick:virtqueue_requests:rate1m{{{Q}}})", "kicks/request")],
                unit="none",
                options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                         "colorMode": "value", "graphMode": "area", "textMode": "auto"}), w=6, h=4)
    L.add(panel("table", "vkickd build", "Version of every scraped vkickd.",
                [target("vkick_build_info", "{{instance}} {{version}}", format="table",
                        instant=True, range=False)]), w=6, h=4)

    L.row("Kicks and requests per virtqueue")
    L.add(timeseries(
        "Notifications per request",
        "Guest->host kicks per completed request (recording rule "
        "vkick:virtqueue_notifications_per_request:rate1m: the host's eBPF count, the guest's "
        "own count for --vhost-user drivers). 1 = one kick per request.",
        [target(f"vkick:virtqueue_notifications_per_request:rate1m{{{Q}}}", QLEG)], unit="none"))
    L.add(timeseries(
        "Notifications / s",
        "Kicks counted on the host per virtqueue (eBPF), beside the kicks the guest driver "
        "reports (they should agree; vkickd distrusts a guest whose count differs).",
        [target(f"vkick:virtqueue_notifications:rate1m{{{Q}}}", "host " + QLEG),
         target(f"vkick:virtqueue_guest_kicks:rate1m{{{Q}}}", "guest " + QLEG)], unit="ops"))
    L.add(timeseries(
        "Requests / s", "Requests submitted per virtqueue, reported by the guest agent.",
        [target(f"vkick:virtqueue_requests:rate1m{{{Q}}}", QLEG)], unit="reqps"))
    L.add(timeseries(
        "Unmatched guest I/O writes / s",
        "Guest MMIO/PIO writes that exited but matched no notify address (not kicks).",
        [target(f"sum by (vm, space) (rate(vkick_vm_unmatched_io_writes_total{{{V}}}[$__rate_interval]))",
                "{{vm}} {{space}}")], unit="ops"))

    L.row("Queue depth and latency (guest agent)")
    L.add(panel("heatmap", "Queue depth (requests in flight)",
                "Distribution of the in-flight requests of the selected queues.",
                [target(f"sum by (le) (increase(vkick_virtqueue_depth_bucket{{{Q}}}[$__rate_interval]))",
                        "{{le}}", format="heatmap")],
                options={"calculate": False, "yAxis": {"unit": "short"},
                         "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"},
                         "tooltip": {"show": True, "yHistogram": True}}))
    L.add(timeseries(
        "Queue depth p50 / p99", "Quantiles of the in-flight requests per queue.",
        [target(f"vkick:virtqueue_depth:p50_rate1m{{{Q}}}", "p50 " + QLEG),
         target(f"vkick:virtqueue_depth:p99_rate1m{{{Q}}}", "p99 " + QLEG)]))
    L.add(timeseries(
        "Request latency p50 / p99", "Request latency quantiles per queue (guest view).",
        [target(f"vkick:virtqueue_request_latency_seconds:p50_rate1m{{{Q}}}", "p50 " + QLEG),
         target(f"vkick:virtqueue_request_latency_seconds:p99_rate1m{{{Q}}}", "p99 " + QLEG)],
        unit="s"), w=24)

    L.row("Kick policy")
    L.add(panel("state-timeline", "Policy mode",
                "Kick policy mode in force per queue (vkick_queue_policy_info{mode}).",
                [target(f"max by (vm, device, queue) ("
                        + " or ".join(f'vkick_queue_policy_info{{{Q},mode="{m}"}} * {i}'
                                      for i, m in enumerate(MODES, 1))
                        + ")", QLEG)],
                fieldConfig={"defaults": {"unit": "short", "mappings": [
                    {"type": "value", "options": {
                        str(i): {"text": m, "color": c, "index": i - 1}
                        for i, (m, c) in enumerate(zip(MODES, MODE_COLORS), 1)}}]},
                             "overrides": []},
                options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.8,
                         "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}),
          w=16)
    L.add(panel("table", "Policy in force",
                "Current mode per queue and the entry it came from (queue, device, vm, default).",
                [target(f"max by (vm, device, queue, mode, source) (vkick_queue_policy_info{{{Q}}})",
                        "", format="table", instant=True, range=False)]), w=8)
    L.add(timeseries(
        "Batch threshold B", "Requests per kick in force (policy parameter B; 1 = kick every request).",
        [target(f"vkick_queue_batch_threshold{{{Q}}}", QLEG)],
        custom_draw="steps"))
    L.add(timeseries(
        "Deferral bound T and p99 latency",
        "T: the longest a request waits for its kick (0 with B = 1), beside the queue's p99 "
        "request latency (alert VkickDeferralLatencyHigh: p99 > T + 2 ms while B > 1).",
        [target(f"vkick_queue_defer_bound_seconds{{{Q}}}", "T " + QLEG),
         target(f"vkick:virtqueue_request_latency_seconds:p99_rate1m{{{Q}}}", "p99 latency " + QLEG)],
        unit="s", custom_draw="steps"))
    L.add(timeseries(
        "Policy switches", "Changes of the policy mode per queue in each interval.",
        [target(f"sum by (vm, device, queue) (increase(vkick_policy_switches_total{{{Q}}}[$__rate_interval]))",
                QLEG)], custom_draw="bars"))
    L.add(timeseries(
        "Kicks fired by the timer T",
        "Share of the guest's kicks fired by the deferral bound because a batch did not fill "
        "(recording rule vkick:virtqueue_timer_kick_ratio:rate1m). Near 1: B is too large.",
        [target(f"vkick:virtqueue_timer_kick_ratio:rate1m{{{Q}}}", QLEG)], unit="percentunit"))
    L.add(panel("state-timeline", "Lease state and policy acknowledged",
                "Lease state the agent reports per queue (expired: the guest fell back to "
                "immediate) and whether it acknowledged the policy in force.",
                [target(f"max by (vm, device, queue) ("
                        + " or ".join(f'(vkick_queue_lease_state{{{Q},state="{st}"}} == 1) * {i}'
                                      for i, st in enumerate(LEASE_STATES))
                        + ")", "lease " + QLEG),
                 target(f"max by (vm, device, queue) (vkick_queue_policy_acked{{{Q}}}) + 10",
                        "acked " + QLEG)],
                fieldConfig={"defaults": {"unit": "short", "mappings": [
                    {"type": "value", "options": {
                        "0": {"text": "none", "color": "text", "index": 0},
                        "1": {"text": "active", "color": "green", "index": 1},
                        "2": {"text": "expired", "color": "red", "index": 2},
                        "10": {"text": "not acked", "color": "orange", "index": 3},
                        "11": {"text": "acked", "color": "green", "index": 4}}}]},
                             "overrides": []},
                options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.8,
                         "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}))

    L.row("Agent channel")
    L.add(timeseries("Agents connected",
                     "Agents past hello on each VM's channel (vm=\"vhost-user\": the --agent-socket "
                     "listener). Alert VkickAgentDisconnected at 0 for 5m.",
                     [target(f"max by (vm) (vkick_agent_connected{{{V}}})", "{{vm}}")],
                     custom_draw="steps"), w=8)
    L.add(timeseries("Rejected guest messages / s",
                     "Agent messages vkickd rejected, by reason (alert VkickGuestMessagesRejected).",
                     [target(f"sum by (vm, reason) (rate(vkick_agent_messages_rejected_total{{{V}}}[$__rate_interval])) > 0",
                             "{{vm}} {{reason}}")], unit="ops"), w=8)
    L.add(timeseries("Agent connections dropped",
                     "Connections vkickd closed (fatal framing, repeated rejections, an agent not "
                     "reading its policies), per interval.",
                     [target(f"sum by (vm) (increase(vkick_agent_connections_dropped_total{{{V}}}[$__rate_interval]))",
                             "{{vm}}")], custom_draw="bars"), w=8)

    L.row("VM exits and interrupts")
    L.add(timeseries("VM exits / s", "All exits per VM (recording rule vkick:vm_exits:rate1m).",
                     [target(f"vkick:vm_exits:rate1m{{{V}}}", "{{vm}}")], unit="ops"))
    L.add(timeseries("VM exits / s by reason", "Exits per VM and decoded exit reason.",
                     [target(f"vkick:vm_exits_by_reason:rate1m{{{V}}}", "{{vm}} {{reason}}")],
                     unit="ops"))
    L.add(timeseries("Interrupts / s", "MSI interrupts injected into each VM.",
                     [target(f"vkick:vm_interrupts:rate1m{{{V}}}", "{{vm}}")], unit="ops"))

    L.row("vkickd health")
    L.add(timeseries("Probe errors / s", "eBPF probe failures by reason.",
                     [target("sum by (instance, reason) (rate(vkick_probe_errors_total[$__rate_interval]))",
                             "{{instance}} {{reason}}")], unit="ops"), w=8)
    L.add(timeseries("QMP errors / s and connected sockets", "QMP failures by socket and reason.",
                     [target("sum by (qmp, reason) (rate(vkick_qmp_errors_total[$__rate_interval]))",
                             "{{qmp}} {{reason}}"),
                      target("sum(vkick_qmp_connected)", "connected QMP sockets")], unit="short"), w=8)
    L.add(timeseries("Discovery and control loop duration p99",
                     "One QMP discovery refresh of one VM; one control loop step.",
                     [target("histogram_quantile(0.99, sum by (instance, le) "
                             "(rate(vkick_discovery_duration_seconds_bucket[$__rate_interval])))",
                             "discovery {{instance}}"),
                      target("histogram_quantile(0.99, sum by (instance, le) "
                             "(rate(vkick_control_loop_duration_seconds_bucket[$__rate_interval])))",
                             "control loop {{instance}}")], unit="s"), w=8)
    L.add(timeseries("Admin and state errors",
                     "Admin socket connections refused by the credential check; policy changes "
                     "refused because the state directory could not be written.",
                     [target("sum by (instance) (increase(vkick_admin_requests_refused_total[$__rate_interval]))",
                             "admin refused {{instance}}"),
                      target("sum by (instance) (increase(vkick_policy_save_errors_total[$__rate_interval]))",
                             "state save errors {{instance}}")], custom_draw="bars"), w=24)

    # "custom_draw" is shorthand for the timeseries draw style.
    for p in L.panels:
        draw = p.pop("custom_draw", None)
        if p["type"] == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": draw or "line", "lineWidth": 1, "fillOpacity": 10,
                "lineInterpolation": "stepAfter" if draw == "steps" else "linear",
                "showPoints": "never", "spanNulls": False}
            if draw == "steps":
                p["fieldConfig"]["defaults"]["custom"]["drawStyle"] = "line"

    return {
        "uid": UID,
        "title": "vkick: virtio kicks and VM exits",
        "description": "vkickd: guest->host notifications, requests, queue depth, latency and the "
                       "adaptive kick policy per VM / device / virtqueue. See docs/operations.md.",
        "tags": ["vkick", "virtio", "kvm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
             "options": [], "includeAll": False, "multi": False},
            # Every queue vkickd knows has a policy (also --vhost-user drivers, which have
            # no host-counted or vkick_vm_info series).
            query_var("vm", "VM", "label_values(vkick_queue_batch_threshold, vm)"),
            query_var("device", "Device",
                      'label_values(vkick_queue_batch_threshold{vm=~"$vm"}, device)'),
            query_var("queue", "Queue",
                      'label_values(vkick_queue_batch_threshold{vm=~"$vm",device=~"$device"}, queue)'),
        ]},
        "annotations": {"list": [
            {"builtIn": 1, "name": "Annotations & Alerts", "type": "dashboard", "enable": True,
             "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
             "datasource": {"type": "grafana", "uid": "-- Grafana --"},
             "target": {"limit": 100, "matchAny": False, "tags": [], "type": "dashboard"}},
            {"name": "Policy switches", "enable": True, "hide": False, "iconColor": "orange",
             "datasource": DS,
             "expr": f"changes(vkick_policy_switches_total{{{Q}}}[1m]) > 0",
             "step": "1m", "titleFormat": "policy switch",
             "textFormat": "{{vm}} {{device}} queue {{queue}}",
             "tagKeys": "vm,device,queue", "useValueForTime": False},
        ]},
        "panels": L.panels,
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "vkick-dashboard.json")
    text = json.dumps(build(), indent=2, sort_keys=False) + "\n"
    if "--check" in sys.argv[1:]:
        with open(path) as f:
            if f.read() != text:
                print(f"{path} is stale: run {sys.argv[0]}", file=sys.stderr)
                return 1
        return 0
    with open(path, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
