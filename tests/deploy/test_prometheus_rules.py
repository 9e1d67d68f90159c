#!/usr/bin/env python3
"""promtool checks of deploy/prometheus: the sample config and the rule files
are valid, the unit tests in rules_test.yml pass, and those unit tests are able
to fail: each alert's condition is broken in a temporary copy of the rules and
`promtool test rules` must then report a failure. Exit 77 without promtool."""
import os, re, shutil, subprocess, sys, tempfile

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
PROM = os.path.join(SRC, "deploy/prometheus")
TEST = os.path.join(SRC, "tests/deploy/rules_test.yml")


def run(*cmd, cwd=None):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def main():
    if not shutil.which("promtool"):
        print("SKIP: promtool not installed (Debian package prometheus)")
        return 77
    failures = []
    r = run("promtool", "check", "config", os.path.join(PROM, "prometheus.yml"))
    print(r.stdout + r.stderr)
    if r.returncode or "2 rule files found" not in r.stdout + r.stderr:
        failures.append("promtool check config")
    rules = sorted(os.path.join(PROM, f) for f in os.listdir(PROM) if f.endswith(".rules.yml"))
    r = run("promtool", "check", "rules", *rules)
    print(r.stdout + r.stderr)
    if r.returncode:
        failures.append("promtool check rules")
    r = run("promtool", "test", "rules", TEST)
    print(r.stdout + r.stderr)
    if r.returncode or "SUCCESS" not in r.stdout:
        failures.append("promtool test rules")

    # Mutations: each must make the unit tests fail.
    alerts = open(os.path.join(PROM, "vkick-alerts.rules.yml")).read()
    recording = open(os.path.join(PROM, "vkick-recording.rules.yml")).read()
    mutations = [
        ("VkickdDown without for", "alerts", "for: 2m", "for: 0m"),
        ("VkickDeferralLatencyHigh inverted", "alerts",
         "> on (job, instance, vm, device, queue)", "< on (job, instance, vm, device, queue)"),
        ("VkickDeferralLatencyHigh without margin", "alerts",
         "(vkick_queue_defer_bound_seconds) + 0.002", "(vkick_queue_defer_bound_seconds) + 0"),
        ("VkickDeferralLatencyHigh on non-batching queues", "alerts",
         "(vkick_queue_batch_threshold) > 1)", "(vkick_queue_batch_threshold) >= 1)"),
        ("VkickDeferralLatencyHigh without for", "alerts", "for: 10m\n        labels:\n          severity: warning\n        annotations:\n          summary: >-\n            Requests",
         "for: 0m\n        labels:\n          severity: warning\n        annotations:\n          summary: >-\n            Requests"),
        ("VkickLeaseExpired on 0", "alerts", '(vkick_queue_lease_state{state="expired"}) == 1',
         '(vkick_queue_lease_state{state="expired"}) == 0'),
        ("VkickLeaseExpired on any state", "alerts", '(vkick_queue_lease_state{state="expired"})',
         "(vkick_queue_lease_state)"),
        ("VkickAgentDisconnected below 2", "alerts", "(vkick_agent_connected) < 1", "(vkick_agent_connected) < 2"),
        ("VkickGuestMessagesRejected >= 0", "alerts",
         "(rate(vkick_agent_messages_rejected_total[5m])) > 0", "(rate(vkick_agent_messages_rejected_total[5m])) >= 0"),
        ("VkickProbeErrors >= 0", "alerts", "(increase(vkick_probe_errors_total[5m])) > 0",
         "(increase(vkick_probe_errors_total[5m])) >= 0"),
        ("VkickQmpDown == 1", "alerts", "(vkick_qmp_connected) == 0", "(vkick_qmp_connected) == 1"),
        ("idle queues divide by zero", "recording", "[1m])) > 0)", "[1m])) >= 0)"),
        ("guest kicks preferred over the host's", "recording",
         "rate(vkick_virtqueue_notifications_total[1m]))\n            or\n              sum by (job, instance, vm, device, queue) (rate(vkick_virtqueue_guest_kicks_total[1m]))",
         "rate(vkick_virtqueue_guest_kicks_total[1m]))\n            or\n              sum by (job, instance, vm, device, queue) (rate(vkick_virtqueue_notifications_total[1m]))"),
        ("no guest-kick fallback", "recording",
         "\n            or\n              sum by (job, instance, vm, device, queue) (rate(vkick_virtqueue_guest_kicks_total[1m]))",
         ""),
        ("exits not summed per VM", "recording", "sum by (job, instance, vm) (rate(vkick_vm_exits_total[1m]))",
         "sum by (job, instance, vm, vcpu) (rate(vkick_vm_exits_total[1m]))"),
    ]
    with tempfile.TemporaryDirectory(prefix="vkick-rules-") as tmp:
        os.makedirs(os.path.join(tmp, "deploy/prometheus"))
        os.makedirs(os.path.join(tmp, "tests/deploy"))
        shutil.copy(TEST, os.path.join(tmp, "tests/deploy/rules_test.yml"))
        for name, which, old, new in mutations:
            a, rec = alerts, recording
            if which == "alerts":
                if old not in a:
                    failures.append(f"mutation '{name}': text not found"); continue
                a = a.replace(old, new, 1)
            else:
                if old not in rec:
                    failures.append(f"mutation '{name}': text not found"); continue
                rec = rec.replace(old, new, 1)
            open(os.path.join(tmp, "deploy/prometheus/vkick-alerts.rules.yml"), "w").write(a)
            open(os.path.join(tmp, "deploy/prometheus/vkick-recording.rules.yml"), "w").write(rec)
            r = run("promtool", "test", "rules", "rules_test.yml", cwd=os.path.join(tmp, "tests/deploy"))
            caught = r.returncode != 0
            print(f"mutation '{name}': {'caught' if caught else 'NOT CAUGHT'}")
            if not caught:
                failures.append(f"mutation '{name}' not caught by rules_test.yml")
    if failures:
        print("FAIL:", *failures, sep="\n  ")
        return 1
    print("OK: config, rules and rule unit tests valid; all mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
