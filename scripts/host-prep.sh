#!/usr/bin/env bash
# Mount what the probes need (tracefs, bpffs) if this host has not. Idempotent.
set -euo pipefail
if [[ $(id -u) -ne 0 ]]; then
  echo "[host-prep] not root: skipping tracefs/bpffs mounts (BPF tests will skip)" >&2
  exit 0
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
