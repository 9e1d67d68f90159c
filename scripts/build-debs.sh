#!/usr/bin/env bash
# Build vkick's Debian packages (debian/): vkick (host), vkick-guest (agent)
# and vkick-virtio-blk-dkms, with dpkg-buildpackage -b -us -uc in a copy of
# the tree (without .git and what .gitignore names), so the work tree stays clean.
#   scripts/build-debs.sh [--out DIR] [--work DIR] [--version V] [--lintian]
#     --out DIR      where the .deb/.buildinfo/.changes go (default build/debs)
#     --work DIR     build directory (default build/deb-work): kept, so a
#                    second run rebuilds only what changed
#     --version V    add a changelog entry V to the copy first (tests: an
#                    upgrade to a newer version); the tree's changelog is untouched
#     --lintian      run lintian (--pedantic --info) on the result: exit 1 on any
#                    tag (E/W/I/P/X) that debian/*.lintian-overrides do not explain
# Build dependencies: debian/control (scripts/setup.sh installs them).
# Install on a host:  apt install ./build/debs/vkick_<version>_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
out=build/debs work=build/deb-work version= lint=0
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --lintian) lint=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-debs: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf '[build-debs] %s\n' "$*"; }
mkdir -p "$out" "$work"
out=$(realpath "$out") work=$(realpath "$work")
tree=$work/vkick

# The copy: the tree without what .gitignore names (build/, ...) and .git.
# rsync keeps the timestamps of unchanged files and the build dir (obj-*,
# protected from --delete), so ninja rebuilds only what changed.
mkdir -p "$tree"
rsync -a --delete --exclude=/.git --filter=':- .gitignore' \
  --filter='P /obj-*' --filter='P /debian/.debhelper' --filter='P /debian/vkick*/' \
  --filter='P /debian/files' --filter='P /debian/*.substvars' --filter='P /debian/debhelper-build-stamp' \
  "$src"/ "$tree"/
cp -p "$src/debian/changelog" "$tree/debian/changelog"
if [[ -n $version ]]; then
  log "changelog entry $version (in the copy)"
  (cd "$tree" && DEBFULLNAME="vkick build" DEBEMAIL="vkick@example.org" \
     dch --newversion "$version" --distribution bookworm --force-distribution "Rebuild as $version." >/dev/null)
fi
# What a previous run left (kept for the incremental build dir): its stamps
# would make dh skip the build, its debian/files would list its .debs.
rm -f "$tree"/debian/debhelper-build-stamp "$tree"/debian/*.debhelper.log "$tree"/debian/files \
  "$tree"/debian/*.substvars

ver=$(cd "$tree" && dpkg-parsechangelog -SVersion)
log "dpkg-buildpackage -b -us -uc: vkick $ver in $tree"
rm -f "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes
(cd "$tree" && DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-parallel=$(nproc)}" \
   dpkg-buildpackage -b -us -uc -nc) >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; log "FAILED (full log: $work/build.log)"; exit 1; }
arch=$(dpkg --print-architecture)
changes=$work/vkick_${ver}_${arch}.changes
for f in $(awk '/^Files:/{f=1;next} /^[^ ]/{f=0} f{print $5}' "$changes") "$(basename "$changes")"; do
  cp "$work/$f" "$out/"
done
log "built in $out:"
(cd "$out" && ls -l ./*_"$ver"_*.deb)
if ((lint)); then
  log "lintian"
  lintian --info --display-info --pedantic --show-overrides "$out/vkick_${ver}_${arch}.changes" | tee "$work/lintian.log" || true
  if grep -q '^[EWIPX]: ' "$work/lintian.log"; then
    log "lintian: tags above that no override explains"; exit 1
  fi
fi
