"""vkicktest: stdlib-only helpers for vkick's integration tests (real QEMU,
KVM, qemu-storage-daemon, vkickd). See tests/integration/README.md."""

from .util import (Skip, skip, log, run_test, Testbed, Process, wait_until, Timeout,
                   free_port, build_dir, source_dir, vkickd_path, guest_elf,
                   require_binary, require_root, require_kvm, require_tracefs)
from .qmp import QmpClient, QmpError
from .metrics import Metrics, parse as parse_metrics, scrape, http_get, ParseError
from .serial import SerialConsole
from .qemu import QemuVm, StorageDaemon
from .vkickd import Vkickd
