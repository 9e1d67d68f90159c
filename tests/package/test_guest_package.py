#!/usr/bin/env python3
"""The vkick-guest package in the TCG guest of the VM testbed (docs/testbed-vm.md).

The testbed's guest is a busybox initramfs: no dpkg, no systemd, no udev. So
the package is unpacked (dpkg-deb -x) on the host together with the shared
libraries its agent needs (at their Debian paths, as `apt install` would have
put them), appended to the initramfs as one more cpio archive, and inside the
guest the agent is started exactly as the package's unit says: the ExecStart
line of /lib/systemd/system/vkick-agent.service (parsed here; the optional
EnvironmentFile is absent, so $VKICK_AGENT_ARGS is empty), with no
LD_LIBRARY_PATH. Checked:
  - the unit's ExecStart binary is the package's and starts in the guest;
  - the package's udev rule matches the testbed's port: a virtio-ports device
    whose name is the rule's ATTR{name} exists in the guest;
  - vkickd on the host sees the agent connected over virtio-serial
    (vkick_agent_connected{vm} == 1).
Not verified here (no systemd/udev in the guest): that udev really starts the
unit (SYSTEMD_WANTS) and BindsTo= stops it; package_install checks the unit
with systemd-analyze verify and the rule's presence in a Debian root.
Exit 0 pass, 1 fail, 77 skipped (reason printed).
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from vkicktest import Testbed, log, run_test, skip, wait_until  # noqa: E402
from vkicktest.vm import (TestbedVm, VM_NAME, VHOST_DEVICE, ensure_guest_image,  # noqa: E402
                          require_vm_testbed)

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(HERE, "../.."))
UNIT = "lib/systemd/system/vkick-agent.service"
RULE = "lib/udev/rules.d/60-vkick-agent.rules"


def guest_deb(bdir):
    v = subprocess.run(["dpkg-parsechangelog", "-l", os.path.join(SRC, "debian/changelog"), "-SVersion"],
                       capture_output=True, text=True).stdout.strip()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    deb = os.path.join(bdir, "pkg", "v1", "vkick-guest_%s_%s.deb" % (v, arch))
    if not os.path.exists(deb):
        skip("%s not built (the package_build test builds it)" % deb)
    return deb


def exec_start(unit_text):
    """argv of the unit's ExecStart, with $VAR / ${VAR} of an absent
    EnvironmentFile expanded to nothing (systemd drops empty $VAR words)."""
    m = re.search(r"^ExecStart=(.*)$", unit_text, re.M)
    assert m, "no ExecStart= in the unit"
    words = shlex.split(m.group(1))
    argv = [w for w in words if not re.fullmatch(r"\$\{?\w+\}?", w)]
    assert argv and argv[0].startswith("/"), "ExecStart is not an absolute path: %r" % m.group(1)
    env = re.search(r"^EnvironmentFile=(-?)(\S+)", unit_text, re.M)
    assert env is None or env.group(1) == "-", "the unit needs an EnvironmentFile the package does not ship"
    return argv


def stage_package(deb, stage):
    """dpkg-deb -x DEB into stage, plus the agent's shared libraries (ldd on
    the host: the same Debian 12 libraries the package depends on)."""
    subprocess.run(["dpkg-deb", "-x", deb, stage], check=True)
    unit = open(os.path.join(stage, UNIT)).read()
    argv = exec_start(unit)
    exe = stage + argv[0]
    assert os.path.isfile(exe) and os.access(exe, os.X_OK), "ExecStart %s is not in the package" % argv[0]
    out = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
    libs = re.findall(r"=> (/\S+)", out) + re.findall(r"^\s*(/\S+ld-linux\S*)", out, re.M)
    for lib in libs:
        real = os.path.realpath(lib)
        for path in {lib, real}:
            dst = stage + path
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if not os.path.exists(dst):
                subprocess.run(["cp", "-L", real, dst], check=True)
    return unit, argv, len(libs)


def main():
    bdir, _ = require_vm_testbed()
    deb = guest_deb(bdir)
    ensure_guest_image(bdir)
    with Testbed("package-guest") as tb:
        stage = tb.path("deb")
        os.makedirs(stage)
        unit, argv, nlibs = stage_package(deb, stage)
        rule = open(os.path.join(stage, RULE)).read()
        m = re.search(r'SUBSYSTEM=="virtio-ports".*ATTR\{name\}=="([^"]+)".*SYSTEMD_WANTS\}\+?="vkick-agent\.service"', rule)
        assert m, "the udev rule does not start vkick-agent.service on a virtio-ports device:\n" + rule
        port = m.group(1)
        log("package: %s; ExecStart %s; %d shared libraries; udev port %s" % (
            os.path.basename(deb), argv, nlibs, port))
        cpio = tb.path("deb.cpio.gz")
        subprocess.run("cd %s && find . -mindepth 1 | sed 's|^\\./||' | cpio -o -H newc --quiet | gzip -1 > %s" % (
            shlex.quote(stage), shlex.quote(cpio)), shell=True, check=True)
        cmd = " ".join(shlex.quote(a) for a in argv)
        script = r"""
found=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = %(port)s ] && found=$p
done
echo "=== PKG-PORT ${found:-none} ==="
test -x %(exe)s || { echo "=== PKG-NOEXE ==="; exit 3; }
env -u LD_LIBRARY_PATH %(exe)s --version
env -u LD_LIBRARY_PATH %(cmd)s > /tmp/pkg-agent.log 2>&1 &
pid=$!
echo "=== PKG-AGENT-STARTED $pid ==="
i=0
while [ $i -lt 600 ] && [ ! -e /dev/vkick-pkg-done ]; do
  kill -0 $pid 2>/dev/null || { echo "=== PKG-AGENT-EXITED ==="; cat /tmp/pkg-agent.log; exit 4; }
  sleep 0.5; i=$((i+1))
  [ $((i %% 20)) = 0 ] && { echo "=== PKG-AGENT-ALIVE $i ==="; tail -3 /tmp/pkg-agent.log; }
done
""" % {"port": shlex.quote(port), "exe": shlex.quote(argv[0]), "cmd": cmd}
        keys = {(VHOST_DEVICE, q) for q in range(2)}
        vm = TestbedVm(tb, bdir, script, keys, testbed_extra=["--initrd-add", cpio],
                       vkickd_extra=["--state-dir=%s" % tb.path("state"),
                                     "--admin-socket=%s" % tb.path("admin.sock")])
        vm.wait_marker("=== PKG-PORT", 180)
        serial = vm.serial()
        pm = re.search(r"=== PKG-PORT (\S+) ===", serial)
        assert pm and pm.group(1) != "none", (
            "no virtio-ports device named %s in the guest: the udev rule would never fire" % port)
        log("guest: the rule's port %s is %s" % (port, pm.group(1)))
        vm.wait_marker("=== PKG-AGENT-STARTED", 60)
        log(vm.boot_log())

        def connected():
            t = vm.serial()
            if "PKG-AGENT-EXITED" in t or "PKG-NOEXE" in t:
                raise AssertionError("the packaged agent did not run:\n" + t[-3000:])
            return vm.vk.metrics().value("vkick_agent_connected", vm=VM_NAME) == 1
        wait_until(connected, 120, "vkick_agent_connected{vm=%s} == 1" % VM_NAME, interval=0.5)
        version = re.search(r"^vkick-agent (\S+)", vm.serial(), re.M)
        log("PASS: the vkick-guest package's agent (%s, started as its unit's ExecStart says) "
            "is connected to vkickd over virtio-serial port %s" % (version and version.group(1), port))


if __name__ == "__main__":
    run_test(main)
