#!/usr/bin/env bash
# The main job. Set-up (packages, guest kernel, build: scripts/setup.sh), host
# preparation (tracefs, bpffs), then:
#   - with no VM given: vkickd beside the built-in demo testbed (scripts/demo.py):
#     vkick-blk driving qemu-storage-daemon with a changing queue depth, the
#     guest agent, the adaptive loop, a live table and the /metrics address;
#   - with --qmp=PATH (repeatable): vkickd attached to your own VMs.
# Ctrl-C stops everything this script started, cleanly.
#
#   scripts/run.sh [--no-setup] [--listen=HOST:PORT] [--duration=SECONDS] [--qmp=PATH ...]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
build="${VKICK_BUILD_DIR:-$root/build}"

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --no-setup           skip scripts/setup.sh (packages and build), e.g. on a second run
  --listen=HOST:PORT   where vkickd serves /metrics (default 127.0.0.1:9470)
  --duration=SECONDS   demo only: stop after this long (default: until Ctrl-C)
  --qmp=PATH           attach vkickd to this VM's QMP socket instead of the demo (repeatable)
  --qmp-dir=DIR        attach vkickd to every QMP socket that appears in DIR instead
  -h, --help           this text
EOF
}

setup=1
qmp=()
demo_args=()
listen="127.0.0.1:9470"
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    --no-setup) setup=0 ;;
    --qmp=*|--qmp-dir=*) qmp+=("$a") ;;
    --listen=*) listen="${a#--listen=}"; demo_args+=("$a") ;;
    --duration=*) demo_args+=("$a") ;;
    *) echo "run.sh: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done

if [[ $EUID -ne 0 ]]; then
  echo "run.sh: must run as root (eBPF probes need CAP_BPF and CAP_PERFMON; set-up uses apt-get)" >&2
  exit 1
fi

if ((setup)); then
  "$here/setup.sh"
fi
"$here/host-prep.sh"

if ((${#qmp[@]})); then
  echo "[run] vkickd attached to ${qmp[*]}; metrics on http://$listen/metrics (Ctrl-C stops)"
  exec "$build/bin/vkickd" "${qmp[@]}" "--listen=$listen"
fi
exec python3 "$here/demo.py" --build-dir="$build" "${demo_args[@]}"
