#!/usr/bin/env bash
# The whole test suite: set-up (packages + build) then every test with CTest.
# Tests that need a capability this machine lacks report SKIPPED with the reason.
#   scripts/test.sh                 # everything
#   scripts/test.sh -L unit         # extra args go to ctest (labels: unit, bpf, integration, fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/host-prep.sh
exec ctest --test-dir build --output-on-failure -j"$(nproc)" "$@"
