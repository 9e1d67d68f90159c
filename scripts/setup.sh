#!/usr/bin/env bash
# One-shot set-up for a fresh Debian 12 machine: installs every package vkick
# needs, fetches the guest kernel package, and builds everything into build/.
# Idempotent: safe to run again. Needs root (apt-get).
# VKICK_BUILD_DEBS=1 also builds the Debian packages into build/debs/.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # toolchain and build
  build-essential cmake ninja-build pkg-config clang llvm lld
  # BPF: libbpf, skeleton generator, libelf/zlib for static guest binaries
  libbpf-dev bpftool libelf-dev zlib1g-dev libzstd-dev
  # C++ libraries
  libabsl-dev prometheus-cpp-dev libgtest-dev libgmock-dev nlohmann-json3-dev
  libcurl4-openssl-dev
  # USDT probes in vkick-blk
  systemtap-sdt-dev
  # testbeds: QEMU (+KVM), qemu-storage-daemon, guest initramfs
  qemu-system-x86 qemu-system-common qemu-utils busybox-static cpio xz-utils kmod
  # guest image tools (scripts/build-guest-image.sh copies the host's binaries in)
  fio e2fsprogs
  # observability: real Prometheus server + promtool; plots for the study
  prometheus gnuplot-nox
  # misc tools used by tests and scripts
  python3 socat curl jq iproute2 procps
  # deploy/ checks (tests/deploy): YAML lint, Kubernetes API models for the manifests
  yamllint python3-yaml python3-kubernetes
  # Debian packages of vkick (debian/, scripts/build-debs.sh, tests/package):
  # build, check, and a clean Debian root to install them into
  debhelper dh-dkms dpkg-dev devscripts fakeroot help2man lintian rsync mmdebstrap man-db
)

log() { printf '[setup] %s\n' "$*"; }

if [[ ${VKICK_SKIP_APT:-0} != 1 ]]; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing ${#missing[@]} packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends keeps the prometheus package from pulling a web UI stack;
    # prometheus itself is never started as a system service by us (tests run their own).
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Debian starts prometheus/prometheus-node-exporter as services on install; we only
    # need the binaries, and a system instance would squat on port 9090.
    if command -v systemctl >/dev/null && systemctl is-active -q prometheus 2>/dev/null; then
      systemctl stop prometheus || true
    fi
  else
    log "all packages present"
  fi
fi

# Guest kernel for the VM testbed (TCG Linux guest): Debian's own kernel package.
if [[ -x scripts/fetch-guest-kernel.sh ]]; then
  scripts/fetch-guest-kernel.sh
fi

log "building (cmake, Release) into build/"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
log "done: binaries in build/bin/"

# Opt-in: the Debian packages too (scripts/build-debs.sh, into build/debs/).
if [[ ${VKICK_BUILD_DEBS:-0} == 1 ]]; then
  log "building the Debian packages (VKICK_BUILD_DEBS=1)"
  scripts/build-debs.sh --lintian
fi
