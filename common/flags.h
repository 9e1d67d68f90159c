// Command lines of every vkick binary, one way (Abseil flags underneath):
//   - flag names are spelled with dashes in docs (--no-probes); Abseil's are
//     identifiers: both spellings are accepted;
//   - --help lists the binary's own flags, named after the binary, never a
//     build machine's source path;
//   - a repeatable flag (--qmp=A --qmp=B) keeps every occurrence, which
//     Abseil alone does not (the last one wins).
#pragma once

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace vkick {

struct CommandLine {
  std::vector<std::string> positional;  // arguments that are not flags (argv[0] excluded)
  // Every occurrence of the repeatable flags, by name, comma lists split.
  std::vector<std::pair<std::string, std::vector<std::string>>> repeated;
  const std::vector<std::string>& Repeated(absl::string_view name) const;
};

struct FlagsSpec {
  absl::string_view binary;        // "vkickd": the name --help shows
  absl::string_view usage;         // first lines of --help
  absl::string_view flags_source;  // path fragment of the file whose flags are the binary's ("controller/daemon/main.cc")
  std::vector<std::string> repeatable = {};  // flag names (with underscores) that may be repeated
};

// Sets up --help and --version ("NAME VERSION", one line), normalises names,
// parses and returns what is left.
// --help prints the binary's flags and exits 0; an unknown flag or a bad
// value is reported and exits 2 (every binary: 1 means its work failed).
CommandLine ParseFlags(int argc, char** argv, const FlagsSpec& spec);

// Pure parts, unit-tested.
std::vector<std::string> NormalizeFlagNames(const std::vector<std::string>& args);
std::vector<std::string> RepeatedFlagValues(const std::vector<std::string>& args, absl::string_view name);

}  // namespace vkick
