"""Small helpers shared by the integration tests: skipping, locating
binaries, free ports, waiting with timeouts, temp dirs, process lifetime."""

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SKIP_EXIT_CODE = 77  # CTest's SKIP_RETURN_CODE (cmake/VkickTest.cmake)


class Skip(Exception):
    """Raised to skip a test: the reason is printed and the test exits 77."""


def skip(reason):
    raise Skip(reason)


def log(*args):
    print("[%7.2f]" % (time.monotonic() - _T0), *args, flush=True)


_T0 = time.monotonic()


# ---------------------------------------------------------------- locating

def build_dir():
    d = os.environ.get("VKICK_BUILD_DIR")
    if d:
        return d
    # Run by hand from the source tree: assume the default build dir.
    return os.path.join(source_dir(), "build")


def source_dir():
    d = os.environ.get("VKICK_SOURCE_DIR")
    if d:
        return d
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def vkickd_path():
    p = os.environ.get("VKICKD") or os.path.join(build_dir(), "bin", "vkickd")
    if not os.access(p, os.X_OK):
        # A missing build product is a broken build, not a missing capability.
        raise AssertionError("vkickd not built at %s (build target 'vkickd')" % p)
    return p


def guest_elf():
    p = os.environ.get("VKICK_NOTIFY_GUEST") or os.path.join(
        build_dir(), "tests", "guests", "notify-guest", "notify-guest.elf")
    if not os.path.exists(p):
        raise AssertionError("notify-guest.elf not built at %s (build target 'notify-guest')" % p)
    return p


def require_binary(name):
    p = shutil.which(name)
    if not p:
        skip("%s not found in PATH (Debian package needed; see scripts/setup.sh)" % name)
    return p


def require_root():
    if os.geteuid() != 0:
        skip("needs root (eBPF tracepoints, QMP pid lookups)")


def require_kvm():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        skip("/dev/kvm not usable: %s" % e)


def require_tracefs():
    if not os.path.isdir("/sys/kernel/tracing/events/kvm") and \
            not os.path.isdir("/sys/kernel/debug/tracing/events/kvm"):
        skip("tracefs with kvm events not mounted (run scripts/host-prep.sh; kvm module loaded?)")


# ---------------------------------------------------------------- network

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks
    it; small race with other users is accepted, callers retry on bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- waiting

class Timeout(AssertionError):
    pass


class Fatal(AssertionError):
    """Raised inside a wait_until predicate when waiting longer is pointless
    (e.g. the process we wait for has exited): wait_until re-raises it at once."""


def wait_until(pred, timeout, what, interval=0.1):
    """Poll pred() until it returns a truthy value (returned) or timeout
    seconds pass (Timeout with `what` and the last value/exception)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = pred()
            if v:
                return v
            last = v
        except Fatal:
            raise
        except Exception as e:  # keep polling; report the last failure
            last = e
        if time.monotonic() >= deadline:
            raise Timeout("timed out after %.1fs waiting for %s (last: %r)" % (timeout, what, last))
        time.sleep(interval)


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # If the test runner dies (CTest timeout kills it with SIGKILL), the
    # kernel sends our children SIGTERM: no stray QEMU keeps running, and
    # QEMU/vkickd/qemu-storage-daemon still get to clean up (they all exit
    # on SIGTERM).
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Process:
    """A child process with its output in a log file; stopped by PID only."""

    def __init__(self, name, argv, logdir, env=None):
        self.name = name
        self.argv = list(argv)
        self.log_path = os.path.join(logdir, name + ".log")
        self._log = open(self.log_path, "wb")
        log("start %s: %s" % (name, " ".join(self.argv)))
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def returncode(self):
        return self.proc.poll()

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Timeout("%s (pid %d) did not exit within %.1fs" % (self.name, self.pid, timeout))

    def stop(self, grace=3.0):
        """SIGTERM, then SIGKILL after `grace` seconds; this PID only."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()

    def kill(self):
        """SIGKILL now (the VM 'goes away' abruptly)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def output(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, n=40):
        return "\n".join(self.output().splitlines()[-n:])


def no_shared_pins(argv):
    """A vkickd started by a test never shares the host's pins
    (/sys/fs/bpf/vkick, vkickd's default --pin-dir): nothing is pinned
    unless the test passes a --pin-dir of its own."""
    if os.path.basename(argv[0]) != "vkickd":
        return list(argv)
    if any(a.startswith(("--pin-dir", "--pin_dir", "-pin-dir", "-pin_dir")) for a in argv[1:]):
        return list(argv)
    return list(argv) + ["--pin-dir="]


class Testbed(contextlib.ExitStack):
    """Owns one test's temp dir and processes; everything is cleaned up on
    exit, also on failure. On failure the process logs are printed."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix="vkick-%s-" % name, dir="/tmp")
        self.procs = []
        self.keep_tmp = bool(os.environ.get("VKICK_KEEP_TMP"))
        self.callback(self._remove_tmp)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def spawn(self, name, argv, env=None):
        argv = no_shared_pins(argv)
        p = Process(name, argv, self.tmp, env=env)
        self.procs.append(p)
        self.callback(p.stop)
        return p

    def dump_logs(self):
        for p in self.procs:
            print("----- %s (pid %d, rc %s) log tail -----" % (p.name, p.pid, p.returncode()))
            print(p.tail())

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not issubclass(exc_type, Skip):
            self.dump_logs()
        return super().__exit__(exc_type, exc, tb)

    def _remove_tmp(self):
        if self.keep_tmp:
            log("keeping", self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_test(main):
    """Entry point for a test script: main() returns on success, raises Skip
    to skip (exit 77), anything else fails (exit 1). SIGTERM/SIGINT unwind
    normally so that every `with Testbed` block cleans up."""
    def _term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, _term)
    try:
        main()
    except Skip as e:
        print("SKIPPED: %s" % e, flush=True)
        sys.exit(SKIP_EXIT_CODE)
    except KeyboardInterrupt as e:
        print("INTERRUPTED: %s" % e, flush=True)
        sys.exit(1)
    print("PASSED", flush=True)
    sys.exit(0)
