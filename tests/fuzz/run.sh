#!/usr/bin/env bash
# Builds the protocol parser with clang++ -fsanitize=fuzzer,address,undefined
# into the build tree and fuzzes it for a bounded time over a generated seed
# corpus. Fails (non-zero) if libFuzzer finds a crash, leak, sanitizer report
# or trap; exit 77 (skip) when clang++ with libFuzzer is not installed.
#   VKICK_FUZZ_SECONDS  total fuzzing time (default 60)
set -euo pipefail
# The sources are where this script is (VKICK_SOURCE_DIR may be a super-project).
src=$(cd "$(dirname "$0")/../.." && pwd)
out=${VKICK_BUILD_DIR:-$src/build}/fuzz
secs=${VKICK_FUZZ_SECONDS:-60}
cxx=${VKICK_FUZZ_CXX:-$(command -v clang++ || command -v clang++-14 || true)}
if [[ -z $cxx ]]; then
  echo "SKIP: clang++ not found (needed for -fsanitize=fuzzer)"; exit 77
fi
mkdir -p "$out/corpus" "$out/seeds" "$out/artifacts"
common=(-std=c++20 -O1 -g -I"$src")
# VKICK_FUZZ_CXXFLAGS=-DVKICK_FUZZ_CANARY plants a bug: run.sh must then fail.
read -r -a extra <<<"${VKICK_FUZZ_CXXFLAGS:-}"
protocol=("$src/protocol/messages.cc" "$src/protocol/codec.cc" "$src/protocol/guard.cc")

"$cxx" "${common[@]}" -o "$out/gen_seeds" "$src/tests/fuzz/gen_seeds.cc" "${protocol[@]}"
"$out/gen_seeds" "$out/seeds"

"$cxx" "${common[@]}" -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all "${extra[@]}" \
  -o "$out/protocol_fuzz" "$src/tests/fuzz/protocol_fuzz.cc" "${protocol[@]}"

# A previous run's findings are kept in artifacts/ for inspection; the test
# fails on any new one. -max_len covers the largest frame plus the chunk byte.
# -error_exitcode: libFuzzer's default (77) is CTest's "skipped" code here.
echo "fuzzing for ${secs}s ($out/protocol_fuzz)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  "$out/protocol_fuzz" -max_total_time="$secs" -max_len=20000 -timeout=10 \
    -rss_limit_mb=1024 -print_final_stats=1 \
    -error_exitcode=1 -timeout_exitcode=1 -artifact_prefix="$out/artifacts/" \
    "$out/corpus" "$out/seeds"
