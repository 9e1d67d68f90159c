#!/usr/bin/env python3
"""deploy/systemd/vkickd.service:
1. `systemd-analyze verify` accepts it (ExecStart pointed at a temporary stand-in
   binary) without a single warning about the unit;
2. least privilege as written: not root, NoNewPrivileges, ProtectSystem=strict,
   ... and the capability set is exactly Ambient == Bounding;
3. the capability set is sufficient AND each capability in it is necessary:
   a libbpf program on tracepoint kvm/kvm_mmio is built and loaded as an
   unprivileged user (setpriv) with exactly the unit's capabilities (must load
   and attach), then with each one removed (must fail).
Part 3 needs root, clang, libbpf-dev and the kvm tracepoints; without them it
is skipped (exit 77) after parts 1 and 2 passed.
"""
import os, re, shutil, subprocess, sys, tempfile

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
UNIT = os.path.join(SRC, "deploy/systemd/vkickd.service")
HERE = os.path.dirname(os.path.abspath(__file__))


def settings(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2).strip())
    return out


def main():
    text = open(UNIT).read()
    s = settings(text)
    fails = []
    want = {"User": "vkick", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
            "PrivateTmp": "yes", "RuntimeDirectory": "vkick", "StateDirectory": "vkick",
            "EnvironmentFile": "/etc/vkick/vkickd.conf", "ExecStart": "/usr/local/bin/vkickd $VKICKD_ARGS"}
    for k, v in want.items():
        if s.get(k, [None])[-1] != v:
            fails.append(f"{k}={s.get(k)} (want {v})")
    amb = set(" ".join(s.get("AmbientCapabilities", [])).split())
    bnd = set(" ".join(s.get("CapabilityBoundingSet", [])).split())
    if amb != bnd or not {"CAP_BPF", "CAP_PERFMON"} <= amb:
        fails.append(f"capabilities: ambient {amb} bounding {bnd}")
    if amb & {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_NET_ADMIN"}:
        fails.append(f"over-privileged: {amb}")
    if "DynamicUser" in s or s.get("User") == ["root"]:
        fails.append("must run as the static user vkick")

    # 1. systemd-analyze verify
    if shutil.which("systemd-analyze"):
        with tempfile.TemporaryDirectory(prefix="vkick-unit-") as tmp:
            exe = os.path.join(tmp, "vkickd")
            with open(exe, "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(exe, 0o755)
            unit = os.path.join(tmp, "vkickd.service")
            with open(unit, "w") as f:
                f.write(text.replace("/usr/local/bin/vkickd", exe))
            r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=120)
            noise = [l for l in (r.stdout + r.stderr).splitlines() if "vkickd" in l]
            print("systemd-analyze verify: rc", r.returncode, *noise, sep="\n  ")
            if r.returncode or noise:
                fails.append("systemd-analyze verify complained")
    else:
        print("note: systemd-analyze missing, verify skipped")
    if fails:
        print("FAIL:", *fails, sep="\n  ")
        return 1
    print("OK: unit verified, least-privilege settings present")

    # 3. capabilities sufficient and necessary
    need = [t for t in ("clang", "gcc", "setpriv") if not shutil.which(t)]
    if os.geteuid() != 0 or need or not os.path.exists("/usr/include/bpf/libbpf.h") \
            or not os.path.exists("/sys/kernel/tracing/events/kvm/kvm_mmio"):
        print(f"SKIP: capability check needs root, clang, gcc, setpriv, libbpf-dev and the kvm "
              f"tracepoints (missing tools: {need}, euid {os.geteuid()})")
        return 77
    caps = sorted(c.lower().replace("cap_", "") for c in amb)
    with tempfile.TemporaryDirectory(prefix="vkick-caps-") as tmp:
        os.chmod(tmp, 0o755)
        obj, loader = os.path.join(tmp, "tp.bpf.o"), os.path.join(tmp, "load")
        arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c",
                        os.path.join(HERE, "caps_probe.bpf.c"), "-o", obj], check=True)
        subprocess.run(["gcc", "-O2", os.path.join(HERE, "caps_loader.c"), "-o", loader, "-lbpf"], check=True)
        os.chmod(obj, 0o644)

        def load(capset):
            c = ",".join(["-all"] + ["+" + x for x in capset])
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                f"--inh-caps={c}", f"--ambient-caps={c}", f"--bounding-set={c}",
                                loader, obj], capture_output=True, text=True, timeout=60)
            return r.returncode, (r.stdout + r.stderr).strip()

        rc, out = load(caps)
        print(f"uid 65534 with {caps}: rc {rc} {out}")
        if rc:
            fails.append(f"the unit's capabilities {caps} do not suffice to load+attach: {out}")
        for c in caps:
            rest = [x for x in caps if x != c]
            rc, out = load(rest)
            print(f"uid 65534 without {c}: rc {rc} {out}")
            if rc == 0:
                fails.append(f"capability {c} is not needed (loads without it): drop it from the unit")
    if fails:
        print("FAIL:", *fails, sep="\n  ")
        return 1
    print("OK: the unit's capabilities are sufficient and each one is necessary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
