// Log lines for vkickd: one line per event, to stderr, with a timestamp.
// Abseil 20220623 (Debian 12) predates absl/log, so this is a tiny sink the
// daemon core receives by injection: tests capture lines instead of parsing
// stderr, and nothing in the core writes to a global stream directly.
#pragma once

#include <functional>
#include <string>
#include "absl/strings/string_view.h"

namespace vkick {

// Receives one complete log line (no trailing newline).
using LogSink = std::function<void(absl::string_view line)>;

// Writes "2026-11-22T18:53:01.123+00:00 vkickd: <line>\n" to stderr with a
// single write(2), so lines from several threads never interleave.
void LogToStderr(absl::string_view line);

}  // namespace vkick
