#!/usr/bin/env python3
"""The Debian packages (debian/, scripts/build-debs.sh), as an operator gets them.

  test_packages.py build    build the .debs (dpkg-buildpackage) twice: the tree's
                            version into $B/pkg/v1 and a bumped one (changelog entry
                            in the copy) into $B/pkg/v2; lintian with no error or
                            warning tag left; `dpkg-deb -c` puts every file where it
                            belongs; the version agrees everywhere.
  test_packages.py install  in a clean Debian 12 root made by mmdebstrap (cached in
                            $B/pkg/): dpkg -i vkick + vkick-guest, the sysusers exist,
                            `vkickd --help`, `man vkickd` ... work from the installed
                            paths, `systemd-analyze verify` accepts the installed units,
                            an upgrade to v2 keeps an edit of /etc/vkick/vkickd.conf,
                            purge leaves no file behind.
  test_packages.py cmake-install
                            `cmake --install` of the build dir (prefix /usr, DESTDIR):
                            every file at its FHS place, the units name what was installed.
  test_packages.py dkms     in that root with the guest kernel's headers: installing
                            vkick-virtio-blk-dkms builds vkick_virtio_blk.ko for the
                            pinned guest kernel (scripts/guest-kernel.env).
Exit 0 pass, 1 fail, 77 skipped (reason printed).
"""
import glob, hashlib, os, re, shutil, subprocess, sys, tempfile, time

SRC = os.environ.get("VKICK_SOURCE_DIR") or os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
BUILD = os.environ.get("VKICK_BUILD_DIR") or os.path.join(SRC, "build")
PKG = os.path.join(BUILD, "pkg")
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() or "amd64"
SKIP = 77
fails = []


def log(*a, **kw):
    print("[package]", *a, flush=True, **kw)


def skip(why):
    log("SKIP:", why)
    sys.exit(SKIP)


def check(cond, what):
    log(("ok   " if cond else "FAIL ") + what)
    if not cond:
        fails.append(what)
    return cond


def run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def changelog_version():
    return run(["dpkg-parsechangelog", "-l", os.path.join(SRC, "debian/changelog"), "-SVersion"]).stdout.strip()


def bumped(v):
    # 0.1.0 -> 0.1.1 (same for 0.1.0+x: the numeric part is bumped).
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", v)
    return f"{m.group(1)}.{m.group(2)}.{int(m.group(3)) + 1}"


def debs(d, version):
    return {p: os.path.join(d, f"{p}_{version}_{a}.deb")
            for p, a in (("vkick", ARCH), ("vkick-guest", ARCH), ("vkick-virtio-blk-dkms", "all"))}


# ---------------------------------------------------------------- build

# Where each package's files must be (regexes over `dpkg-deb -c` paths), and
# which must be there.
LAYOUT = {
    "vkick": [r"/usr/bin/vkickd", r"/usr/bin/vkickctl", r"/usr/share/man/man1/vkickd?(ctl)?\.1\.gz",
              r"/lib/systemd/system/vkickd\.service", r"/usr/lib/sysusers\.d/vkick\.conf",
              r"/usr/lib/tmpfiles\.d/vkick\.conf", r"/etc/vkick/vkickd\.conf",
              r"/usr/share/doc/vkick/.*", r"/usr/share/vkick/prometheus/[a-z.-]+\.yml",
              r"/usr/share/vkick/grafana/vkick-dashboard\.json", r"/usr/share/lintian/overrides/vkick"],
    "vkick-guest": [r"/usr/bin/vkick-agent", r"/usr/share/man/man1/vkick-agent\.1\.gz",
                    r"/lib/systemd/system/vkick-agent\.service", r"/lib/udev/rules\.d/60-vkick-agent\.rules",
                    r"/usr/share/doc/vkick-guest/.*", r"/usr/share/lintian/overrides/vkick-guest"],
    "vkick-virtio-blk-dkms": [r"/usr/src/vkick-virtio-blk-[0-9.]+/(Kbuild|dkms\.conf|[a-z_]+\.[ch])",
                              r"/usr/share/doc/vkick-virtio-blk-dkms/.*"],
}
MUST = {
    "vkick": ["/usr/bin/vkickd", "/usr/bin/vkickctl", "/usr/share/man/man1/vkickd.1.gz",
              "/usr/share/man/man1/vkickctl.1.gz", "/lib/systemd/system/vkickd.service",
              "/usr/lib/sysusers.d/vkick.conf", "/usr/lib/tmpfiles.d/vkick.conf", "/etc/vkick/vkickd.conf",
              "/usr/share/doc/vkick/operations.md", "/usr/share/doc/vkick/copyright",
              "/usr/share/vkick/prometheus/vkick-alerts.rules.yml",
              "/usr/share/vkick/prometheus/vkick-recording.rules.yml",
              "/usr/share/vkick/grafana/vkick-dashboard.json"],
    "vkick-guest": ["/usr/bin/vkick-agent", "/usr/share/man/man1/vkick-agent.1.gz",
                    "/lib/systemd/system/vkick-agent.service", "/lib/udev/rules.d/60-vkick-agent.rules"],
    "vkick-virtio-blk-dkms": ["/usr/src/vkick-virtio-blk-{up}/dkms.conf", "/usr/src/vkick-virtio-blk-{up}/Kbuild",
                              "/usr/src/vkick-virtio-blk-{up}/blk_driver.c"],
}


def contents(deb):
    out = []
    for line in run(["dpkg-deb", "-c", deb]).stdout.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        path = "/" + path.lstrip("./")
        if not path.endswith("/"):
            out.append(path)
    return out


def build():
    for tool in ("dpkg-buildpackage", "dh", "lintian", "dch", "help2man", "rsync"):
        if not shutil.which(tool):
            skip(f"{tool} is not installed (scripts/setup.sh installs the packaging tools)")
    r = run(["dpkg-checkbuilddeps", os.path.join(SRC, "debian/control")])
    if r.returncode != 0:
        skip(f"build dependencies missing: {r.stderr.strip()}")
    v1 = changelog_version()
    v2 = bumped(v1)
    work = os.path.join(PKG, "work")
    t0 = time.time()
    for v, out, extra in ((v1, "v1", ["--lintian"]), (v2, "v2", ["--version", v2])):
        shutil.rmtree(os.path.join(PKG, out), ignore_errors=True)
        r = run([os.path.join(SRC, "scripts/build-debs.sh"), "--out", os.path.join(PKG, out), "--work", work] + extra,
                cwd=SRC, capture_output=False)
        if not check(r.returncode == 0, f"build-debs.sh {' '.join(extra)} -> {out} ({v})"):
            return
        log(f"built {v} in {time.time() - t0:.0f} s")
        t0 = time.time()
    lint = open(os.path.join(work, "lintian.log")).read()
    tags = [l for l in lint.splitlines() if re.match(r"^[EWIPX]: ", l)]
    check(not tags, "lintian --pedantic --info: no tag but overridden ones (each with its reason): "
          + "; ".join(tags))
    overridden = sorted({l for l in lint.splitlines() if l.startswith("O: ")})

    up = v1.split("-")[0]
    for pkg, deb in debs(os.path.join(PKG, "v1"), v1).items():
        if not check(os.path.exists(deb), f"{os.path.basename(deb)} exists"):
            continue
        files = contents(deb)
        log(f"{pkg}: {len(files)} files, {os.path.getsize(deb) // 1024} KiB")
        stray = [f for f in files if not any(re.fullmatch(p, f) for p in LAYOUT[pkg])]
        check(not stray, f"{pkg}: every file at its FHS place (stray: {stray})")
        missing = [m.format(up=up) for m in MUST[pkg] if m.format(up=up) not in files]
        check(not missing, f"{pkg}: has {len(MUST[pkg])} required files (missing: {missing})")
        check(run(["dpkg-deb", "-f", deb, "Version"]).stdout.strip() == v1, f"{pkg}: Version {v1}")
    # The unit names the installed paths; conffile; --version of the packaged binary.
    with tempfile.TemporaryDirectory() as x:
        d = debs(os.path.join(PKG, "v1"), v1)
        run(["dpkg-deb", "-x", d["vkick"], x])
        run(["dpkg-deb", "-e", d["vkick"], os.path.join(x, "DEBIAN")])
        unit = open(os.path.join(x, "lib/systemd/system/vkickd.service")).read()
        exe = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
        env = re.search(r"^EnvironmentFile=-?(\S+)", unit, re.M).group(1)
        check(os.path.isfile(x + exe) and os.access(x + exe, os.X_OK), f"unit ExecStart {exe} is in the package")
        check(os.path.isfile(x + env), f"unit EnvironmentFile {env} is in the package")
        conff = open(os.path.join(x, "DEBIAN/conffiles")).read().split()
        check("/etc/vkick/vkickd.conf" in conff, f"/etc/vkick/vkickd.conf is a conffile ({conff})")
        postinst = open(os.path.join(x, "DEBIAN/postinst")).read()
        check("systemd-sysusers" in postinst and "vkick.conf" in postinst, "postinst runs systemd-sysusers vkick.conf")
        r = run([x + "/usr/bin/vkickd", "--version"])
        check(r.returncode == 0 and r.stdout.strip() == f"vkickd {v1}",
              f"packaged vkickd --version says 'vkickd {v1}' (got {r.stdout.strip()!r})")
    log("overridden lintian tags:", *overridden, sep="\n  ")


# ---------------------------------------------------------------- chroot

def mirror_sources():
    """deb822 stanzas of the host's Debian archive (the one apt uses here)."""
    stanzas = []
    for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for st in open(f).read().split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm", st, re.M) and re.search(r"^URIs:.*debian", st, re.M) \
               and re.search(r"^Types:.*\bdeb\b", st, re.M):
                stanzas.append(st.strip())
    for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        if os.path.exists(f):
            for line in open(f):
                if re.match(r"^deb\s.*debian.*\bbookworm", line):
                    stanzas.append(line.strip())
    return "\n\n".join(stanzas) + "\n"


def chroot_tarball(extra):
    """A cached mmdebstrap bookworm root (variant apt) with the packages named:
    a directory, used read-only as the lower layer of an overlay (Root)."""
    if not shutil.which("mmdebstrap"):
        skip("mmdebstrap is not installed (scripts/setup.sh installs it)")
    sources = mirror_sources()
    if "deb" not in sources:
        skip("no Debian bookworm archive in /etc/apt/sources.list*")
    key = hashlib.sha256((sources + " ".join(sorted(extra))).encode()).hexdigest()[:12]
    root = os.path.join(PKG, f"root-{key}")
    if os.path.isfile(os.path.join(root, ".complete")):
        log(f"chroot: cached {root}")
        return root
    os.makedirs(PKG, exist_ok=True)
    src = os.path.join(PKG, f"root-{key}.sources")
    open(src, "w").write(sources)
    t0 = time.time()
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    log(f"mmdebstrap bookworm (variant apt, {len(extra)} packages: {' '.join(sorted(extra))}) -> {root}")
    r = run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(sorted(extra)),
             "bookworm", tmp, src], capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(r.stdout[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
        if re.search(r"(Could not resolve|Temporary failure|Failed to fetch|Connection)", r.stdout):
            skip("mmdebstrap could not reach the Debian archive")
        check(False, "mmdebstrap made the root")
        finish()
    open(os.path.join(tmp, ".complete"), "w").close()
    os.rename(tmp, root)
    log(f"chroot: made in {time.time() - t0:.0f} s")
    return root


class Root:
    """A throw-away root: an overlay on the cached one (writes go to a
    temporary upper layer), /proc /sys /dev and a private bpffs mounted;
    unmounted and removed on exit."""

    def __init__(self, lower):
        self.lower = lower
        self.mounts = []

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="overlay-", dir=PKG)
        self.dir = os.path.join(self.tmp, "root")
        for d in ("upper", "work", "root"):
            os.makedirs(os.path.join(self.tmp, d))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.tmp}/upper,workdir={self.tmp}/work", self.dir],
                       check=True)
        self.mounts.append(self.dir)
        for args, where in ((["-t", "proc", "proc"], "proc"), (["--rbind", "/dev"], "dev"),
                            (["-t", "sysfs", "sysfs"], "sys"), (["-t", "bpf", "bpf"], "sys/fs/bpf")):
            tgt = os.path.join(self.dir, where)
            os.makedirs(tgt, exist_ok=True)
            if subprocess.run(["mount"] + args + [tgt]).returncode == 0:
                self.mounts.append(tgt)
        shutil.copy("/etc/resolv.conf", os.path.join(self.dir, "etc/resolv.conf"))
        return self

    def sh(self, script, check_rc=None):
        r = run(["chroot", self.dir, "/bin/sh", "-c", script],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
                     "HOME": "/root"})
        if check_rc is not None:
            check(r.returncode == 0, f"{check_rc}" + ("" if r.returncode == 0 else
                                                       f" (rc {r.returncode}: {(r.stdout + r.stderr)[-1500:]})"))
        return r

    def copy_in(self, path):
        shutil.copy(path, os.path.join(self.dir, "tmp"))
        return "/tmp/" + os.path.basename(path)

    def files(self):
        # Every file and directory outside the volatile places.
        r = self.sh("find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp "
                    "-o -path /var/cache -o -path /var/lib/apt -o -path /var/log -o -path /var/lib/dpkg "
                    "-o -path /var/lib/systemd/deb-systemd-helper-enabled -o -path /var/lib/systemd/deb-systemd-helper-masked "
                    "\\) -prune -o -print | sort")
        return set(r.stdout.split("\n"))

    def __exit__(self, *a):
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", m])
        shutil.rmtree(self.tmp, ignore_errors=True)


def need_debs():
    v1 = changelog_version()
    v2 = bumped(v1)
    d1, d2 = debs(os.path.join(PKG, "v1"), v1), debs(os.path.join(PKG, "v2"), v2)
    for d in (d1, d2):
        for f in d.values():
            if not os.path.exists(f):
                skip(f"{f} not built (the package_build test builds it)")
    if os.geteuid() != 0:
        skip("needs root (chroot, mount)")
    return v1, v2, d1, d2


def runtime_deps(deb):
    """First alternative of every Depends of DEB, without versions."""
    dep = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
    return {d.split("|")[0].split("(")[0].strip() for d in dep.split(",") if d.strip()}


def install():
    v1, v2, d1, d2 = need_debs()
    deps = (runtime_deps(d1["vkick"]) | runtime_deps(d1["vkick-guest"]) | {"man-db", "systemd"})
    deps = {d for d in deps if not d.startswith("vkick")}
    with Root(chroot_tarball(deps)) as root:
        before = root.files()
        debs1 = [root.copy_in(d1[p]) for p in ("vkick", "vkick-guest")]
        debs2 = [root.copy_in(d2[p]) for p in ("vkick", "vkick-guest")]
        # dpkg, not apt: every dependency is already in the root, so nothing is
        # fetched and a missing one fails here.
        root.sh("dpkg -i " + " ".join(debs1), check_rc=f"dpkg -i vkick vkick-guest {v1}")
        root.sh("dpkg-query -W -f='${Status}\\n' vkick vkick-guest | grep -c 'install ok installed' | grep -qx 2",
                check_rc="both packages are configured")
        # Users and groups made by systemd-sysusers at configure.
        r = root.sh("getent passwd vkick; id -nG vkick")
        check(r.returncode == 0 and re.search(r"^vkick:x:\d+:\d+:.*:/var/lib/vkick:/usr/sbin/nologin$", r.stdout, re.M)
              and set(r.stdout.split("\n")[1].split()) == {"vkick", "vkick-qmp", "vkick-admin"},
              f"sysuser vkick (home /var/lib/vkick, nologin) in vkick, vkick-qmp, vkick-admin: {r.stdout.strip()!r}")
        r = root.sh("vkickd --help")
        check(r.returncode == 0 and "--qmp" in r.stdout, "vkickd --help from /usr/bin (PATH) works")
        for b, v in (("vkickd", v1), ("vkickctl", v1), ("vkick-agent", v1)):
            r = root.sh(f"command -v {b} && {b} --version")
            check(r.returncode == 0 and r.stdout.split() == [f"/usr/bin/{b}", b, v],
                  f"{b} --version from /usr/bin: {r.stdout.strip()!r}")
            r = root.sh(f"MANPAGER=cat MANWIDTH=80 man {b}")
            check(r.returncode == 0 and re.search(rf"^NAME\s*\n\s*{re.escape(b)}\s+-\s+\S", r.stdout, re.M),
                  f"man {b} renders the installed page (NAME {b} - ...)")
        r = root.sh("MANPAGER=cat man vkickd")
        check("--qmp" in r.stdout or "-qmp" in r.stdout.replace("\u2010", "-"), "man vkickd documents --qmp")
        # The units: the files they name exist at the installed paths, and
        # systemd-analyze (the root's own systemd 252) accepts them.
        for unit in ("vkickd.service", "vkick-agent.service"):
            text = root.sh(f"cat /lib/systemd/system/{unit}").stdout
            exe = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
            check(root.sh(f"test -x {exe}").returncode == 0, f"{unit}: ExecStart {exe} is installed")
            env = re.search(r"^EnvironmentFile=(-?)(\S+)", text, re.M)
            if env.group(1) != "-":
                check(root.sh(f"test -f {env.group(2)}").returncode == 0, f"{unit}: EnvironmentFile {env.group(2)} is installed")
            r = root.sh(f"SYSTEMD_LOG_LEVEL=notice systemd-analyze verify /lib/systemd/system/{unit}")
            noise = [l for l in (r.stdout + r.stderr).splitlines() if unit in l or "vkick" in l]
            check(r.returncode == 0 and not noise, f"systemd-analyze verify {unit} (in the root): rc {r.returncode} {noise}")
        check(root.sh("test -f /lib/udev/rules.d/60-vkick-agent.rules && udevadm verify /lib/udev/rules.d/60-vkick-agent.rules "
                      "2>/dev/null || grep -q 'ATTR{name}==\"org.vkick.agent.0\"' /lib/udev/rules.d/60-vkick-agent.rules")
              .returncode == 0, "udev rule for org.vkick.agent.0 installed")
        check(root.sh("! test -e /etc/systemd/system/multi-user.target.wants/vkickd.service").returncode == 0,
              "vkickd.service is not enabled on install")
        check(root.sh("systemctl is-enabled vkickd.service; true").stdout.strip() in ("disabled", ""),
              "systemctl is-enabled vkickd: disabled")
        # Upgrade keeps the operator's edit of the conffile.
        root.sh("sed -i 's|--control-interval=1s|--control-interval=2s|' /etc/vkick/vkickd.conf && "
                "echo '# operator was here' >> /etc/vkick/vkickd.conf")
        edited = root.sh("sha256sum /etc/vkick/vkickd.conf").stdout
        root.sh("dpkg -i " + " ".join(debs2) + " </dev/null", check_rc=f"upgrade to {v2} (dpkg -i, no prompt)")
        r = root.sh("dpkg-query -W -f='${Version}' vkick; echo; vkickd --version")
        check(r.stdout.split() == [v2, "vkickd", v2], f"upgraded: package and binary say {v2}: {r.stdout.split()}")
        check(root.sh("sha256sum /etc/vkick/vkickd.conf").stdout == edited
              and root.sh("grep -q -- --control-interval=2s /etc/vkick/vkickd.conf").returncode == 0,
              "the edit of /etc/vkick/vkickd.conf survived the upgrade")
        check(root.sh("ls /etc/vkick/vkickd.conf.dpkg-* 2>/dev/null").stdout == "", "no .dpkg-dist/.dpkg-new left")
        # Run-time state vkickd would have made, then purge.
        root.sh("mkdir -p /var/lib/vkick/policies /sys/fs/bpf/vkick && echo x > /var/lib/vkick/policies/state.json")
        root.sh("dpkg --purge vkick vkick-guest", check_rc="dpkg --purge vkick vkick-guest")
        for p in ("/etc/vkick", "/var/lib/vkick", "/sys/fs/bpf/vkick"):
            check(root.sh(f"! test -e {p}").returncode == 0, f"purge removed {p}")
        after = root.files()
        # systemd-sysusers keeps backups of the files it edits (passwd-, group-,
        # shadow-, gshadow-), as useradd would; the users stay (Debian practice).
        allowed = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}
        check(not (after - before - allowed), f"purge left nothing behind (new: {sorted(after - before - allowed)[:20]})")
        check(not (before - after), f"purge removed nothing of the base (gone: {sorted(before - after)[:20]})")


def dkms():
    v1, _, d1, _ = need_debs()
    env = dict(re.findall(r"^(GUEST_KERNEL_\w+)=(\S+)", open(os.path.join(SRC, "scripts/guest-kernel.env")).read(), re.M))
    abi, kver = env["GUEST_KERNEL_ABI"], env["GUEST_KERNEL_VERSION"]
    kernel = f"{abi}-amd64"
    tar = chroot_tarball({"dkms", f"linux-headers-{kernel}", "kmod"})
    with Root(tar) as root:
        hv = root.sh(f"dpkg-query -W -f='${{Version}}' linux-headers-{kernel}").stdout
        if hv != kver:
            log(f"note: the root has linux-headers-{kernel} {hv}, the pin is {kver}")
        deb = root.copy_in(d1["vkick-virtio-blk-dkms"])
        t0 = time.time()
        r = root.sh(f"dpkg -i {deb}", check_rc="dpkg -i vkick-virtio-blk-dkms")
        log(f"install + dkms in {time.time() - t0:.0f} s")
        print(r.stdout[-2000:])
        up = v1.split("-")[0]
        r = root.sh("dkms status vkick-virtio-blk")
        check(re.search(rf"vkick-virtio-blk/{re.escape(up)}, {re.escape(kernel)}, \S+: installed", r.stdout) is not None,
              f"the package's postinst built and installed the module for {kernel} (dkms autoinstall): {r.stdout.strip()!r}")
        ko = f"/lib/modules/{kernel}/updates/dkms/vkick_virtio_blk.ko"

        def module_ok(what):
            r = root.sh(f"test -f {ko} && modinfo -F vermagic {ko}")
            check(r.returncode == 0 and r.stdout.startswith(kernel + " "),
                  f"{what}: {ko} built for {kernel} (vermagic {r.stdout.strip()!r})")
        module_ok("after dpkg -i")
        # A kernel update: the new kernel's package runs /etc/kernel/postinst.d/dkms
        # <version>, which builds every AUTOINSTALL module not yet built for it.
        # Simulated on the same kernel: unbuild, then the hook.
        root.sh(f"dkms unbuild -m vkick-virtio-blk -v {up} -k {kernel}", check_rc=f"dkms unbuild -k {kernel}")
        check(root.sh(f"! test -e {ko}").returncode == 0, "module gone after unbuild")
        t0 = time.time()
        root.sh(f"/etc/kernel/postinst.d/dkms {kernel}", check_rc=f"kernel hook /etc/kernel/postinst.d/dkms {kernel}")
        log(f"kernel hook rebuilt in {time.time() - t0:.0f} s")
        module_ok("after the kernel hook (what a kernel update runs)")
        r = root.sh("dkms status vkick-virtio-blk")
        check(f"{kernel}" in r.stdout and "installed" in r.stdout, f"dkms status: {r.stdout.strip()}")
        root.sh("dpkg --purge vkick-virtio-blk-dkms", check_rc="dpkg --purge vkick-virtio-blk-dkms")
        check(root.sh(f"! test -e {ko} && ! test -e /usr/src/vkick-virtio-blk-{up}").returncode == 0,
              "purge removed the module and its source")


def cmake_install():
    """`cmake --install` of this build dir with prefix /usr into a DESTDIR:
    the FHS layout the packages also use (units under /usr/lib here), and the
    installed units name the installed binary and configuration."""
    want = ["/usr/bin/vkickd", "/usr/bin/vkickctl", "/usr/bin/vkick-agent",
            "/usr/lib/systemd/system/vkickd.service", "/usr/lib/systemd/system/vkick-agent.service",
            "/usr/lib/udev/rules.d/60-vkick-agent.rules",
            "/usr/lib/sysusers.d/vkick.conf", "/usr/lib/tmpfiles.d/vkick.conf", "/etc/vkick/vkickd.conf",
            "/usr/share/doc/vkick/operations.md", "/usr/share/doc/vkick/README.md",
            "/usr/share/vkick/prometheus/vkick-alerts.rules.yml", "/usr/share/vkick/prometheus/vkick-recording.rules.yml",
            "/usr/share/vkick/grafana/vkick-dashboard.json"]
    if shutil.which("help2man"):
        want += ["/usr/share/man/man1/vkickd.1", "/usr/share/man/man1/vkickctl.1", "/usr/share/man/man1/vkick-agent.1"]
    with tempfile.TemporaryDirectory() as d:
        r = run(["cmake", "--install", BUILD, "--prefix", "/usr"], env=dict(os.environ, DESTDIR=d))
        if not check(r.returncode == 0, f"DESTDIR={d} cmake --install {BUILD} --prefix /usr"
                     + ("" if r.returncode == 0 else f": {(r.stdout + r.stderr)[-1500:]}")):
            return
        files = sorted("/" + os.path.relpath(os.path.join(dp, f), d) for dp, _, fs in os.walk(d) for f in fs)
        log(f"{len(files)} files installed")
        missing = [w for w in want if w not in files]
        check(not missing, f"installed at the FHS paths (missing: {missing})")
        for unit in ("vkickd.service", "vkick-agent.service"):
            text = open(f"{d}/usr/lib/systemd/system/{unit}").read()
            exe = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
            check(exe.startswith("/usr/bin/") and os.access(d + exe, os.X_OK), f"{unit}: ExecStart {exe} installed")
            env = re.search(r"^EnvironmentFile=(-?)(\S+)", text, re.M)
            if env and not env.group(1):
                check(os.path.isfile(d + env.group(2)), f"{unit}: EnvironmentFile {env.group(2)} installed")
        stray = [f for f in files if not re.match(r"^/(usr/(bin|lib/(systemd/system|udev/rules.d|sysusers.d|tmpfiles.d)"
                                                     r"|share/(doc/vkick|vkick|man/man1))|etc/vkick)/", f)]
        check(not stray, f"nothing outside those places (stray: {stray})")


def finish():
    if fails:
        log(f"{len(fails)} check(s) failed:", *fails, sep="\n  ")
        sys.exit(1)
    log("all checks passed")
    sys.exit(0)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    t0 = time.time()
    {"build": build, "install": install, "dkms": dkms, "cmake-install": cmake_install}[what]()
    log(f"{what}: {time.time() - t0:.0f} s")
    finish()
