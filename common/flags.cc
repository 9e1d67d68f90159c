#include "common/flags.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/internal/program_name.h"
#include "absl/flags/internal/usage.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace vkick {

const std::vector<std::string>& CommandLine::Repeated(absl::string_view name) const {
  static const std::vector<std::string> kNone;
  for (const auto& [n, v] : repeated)
    if (n == name) return v;
  return kNone;
}

std::vector<std::string> NormalizeFlagNames(const std::vector<std::string>& args) {
  std::vector<std::string> out = args;
  for (size_t i = 1; i < out.size(); ++i) {
    std::string& a = out[i];
    if (a == "--") break;
    if (a.size() < 2 || a[0] != '-') continue;
    const size_t start = a[1] == '-' ? 2 : 1;
    const size_t end = std::min(a.find('='), a.size());
    std::replace(a.begin() + static_cast<std::ptrdiff_t>(start), a.begin() + static_cast<std::ptrdiff_t>(end), '-', '_');
  }
  return out;
}

// "--name=X", "-name=X", "--name X", "-name X", up to "--"; comma lists split.
std::vector<std::string> RepeatedFlagValues(const std::vector<std::string>& args, absl::string_view name) {
  std::vector<std::string> out;
  auto add = [&](absl::string_view v) {
    for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipEmpty())) out.emplace_back(p);
  };
  const std::string eq1 = absl::StrCat("--", name, "="), eq2 = absl::StrCat("-", name, "=");
  const std::string bare1 = absl::StrCat("--", name), bare2 = absl::StrCat("-", name);
  for (size_t i = 1; i < args.size(); ++i) {
    absl::string_view a = args[i];
    if (a == "--") break;
    if (absl::ConsumePrefix(&a, eq1) || absl::ConsumePrefix(&a, eq2)) {
      add(a);
    } else if ((a == bare1 || a == bare2) && i + 1 < args.size()) {
      add(args[++i]);
    }
  }
  return out;
}

namespace {

bool IsBuiltinFlag(absl::string_view name) {
  for (const char* b : {"help", "helpfull", "helpshort", "helppackage", "helpon", "helpmatch", "version",
                        "only_check_args", "flagfile", "fromenv", "tryfromenv", "undefok"}) {
    if (name == b) return true;
  }
  return false;
}

// Abseil exits 1 on an unknown flag or a bad value; our contract is exit 2
// for bad flags (1 means the I/O failed). So check them first, by the same
// rules: --name=value, --name value (non-bool), --name / --noname (bool).
bool CheckFlags(absl::string_view binary, std::vector<std::string>& args) {
  for (size_t i = 1; i < args.size(); ++i) {
    absl::string_view a = args[i];
    if (a == "--") break;
    if (a.size() < 2 || a[0] != '-') continue;  // positional: reported later
    a.remove_prefix(a[1] == '-' ? 2 : 1);
    absl::string_view name = a, value;
    const size_t eq = a.find('=');
    const bool has_value = eq != absl::string_view::npos;
    if (has_value) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
    }
    if (IsBuiltinFlag(name)) continue;
    absl::CommandLineFlag* f = absl::FindCommandLineFlag(name);
    if (f == nullptr && !has_value && absl::StartsWith(name, "no")) {
      absl::CommandLineFlag* nf = absl::FindCommandLineFlag(name.substr(2));
      if (nf != nullptr && nf->IsOfType<bool>()) continue;
    }
    if (f == nullptr) {
      std::fprintf(stderr, "%s: unknown flag '%s' (see --help)\n", std::string(binary).c_str(), args[i].c_str());
      return false;
    }
    if (!has_value) {
      if (f->IsOfType<bool>()) continue;
      if (i + 1 >= args.size()) {
        std::fprintf(stderr, "%s: flag '--%s' needs a value (see --help)\n", std::string(binary).c_str(), std::string(name).c_str());
        return false;
      }
      value = args[++i];
    }
    // ParseFrom sets the flag; harmless, ParseCommandLine sets it again.
    std::string err;
    if (!f->ParseFrom(value, &err)) {
      std::fprintf(stderr, "%s: bad value '%s' for --%s: %s\n", std::string(binary).c_str(), std::string(value).c_str(),
                   std::string(name).c_str(), err.c_str());
      return false;
    }
  }
  return true;
}

#ifndef VKICK_VERSION
#error "VKICK_VERSION is set by common/CMakeLists.txt"
#endif

// Words of `text` in lines of at most `width` characters, each prefixed by `indent`.
std::string Wrap(absl::string_view text, size_t width, absl::string_view indent) {
  std::string out, line;
  for (absl::string_view w : absl::StrSplit(text, absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
    if (!line.empty() && indent.size() + line.size() + 1 + w.size() > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
    }
    absl::StrAppend(&line, line.empty() ? "" : " ", w);
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

// --help: the usage message, then the binary's own flags in the layout
// help2man makes a man page of (the pages in share/man/man1 are generated from
// it): the flag alone on an indented line, its help and default on the lines
// below, indented further. --helpfull keeps Abseil's own listing.
void PrintHelp(std::ostream& out, const FlagsSpec& spec) {
  std::vector<const absl::CommandLineFlag*> flags;
  for (const auto& [name, f] : absl::GetAllFlags()) {
    // Filename() is already normalised by ConfigureUsage: the binary's name.
    const std::string file = f->Filename();
    if (file == spec.binary || absl::StrContains(file, spec.flags_source)) flags.push_back(f);
  }
  std::sort(flags.begin(), flags.end(), [](auto* a, auto* b) { return a->Name() < b->Name(); });
  out << spec.binary << ": " << absl::ProgramUsageMessage() << "\n\nFlags:\n";
  for (const absl::CommandLineFlag* f : flags) {
    const bool is_bool = f->IsOfType<bool>();
    out << "  --" << f->Name() << (is_bool ? "" : "=VALUE") << "\n";
    std::string def = f->DefaultValue();
    if (f->IsOfType<std::string>()) def = absl::StrCat("\"", def, "\"");
    out << Wrap(absl::StrCat(f->Help(), " Default: ", def, "."), 78, "      ");
  }
}

// --help (and --helpshort) is a successful run: exit 0 with the binary's
// own flags (Abseil 20220623 exits 1, which the binaries reserve for
// failures). --helpfull and the others keep Abseil's handling.
void HelpIfAsked(const std::vector<std::string>& args, const FlagsSpec& spec) {
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") return;
    // --version: one line, "NAME VERSION" (help2man makes the man pages from
    // --help and --version; the version is debian/changelog's, via CMake).
    if (a == "--version" || a == "-version") {
      std::cout << spec.binary << " " << VKICK_VERSION << "\n";
      std::exit(0);
    }
    if (a == "--help" || a == "-help" || a == "--helpshort" || a == "-helpshort") {
      PrintHelp(std::cout, spec);
      std::exit(0);
    }
  }
}

// Set once per process before parsing; Abseil's usage config takes plain
// function objects, so the spec is copied into them.
void ConfigureUsage(const FlagsSpec& spec) {
  absl::FlagsUsageConfig cfg;
  const std::string source(spec.flags_source), binary(spec.binary);
  // Abseil hands the filters the name normalize_filename made: the binary's.
  auto ours = [source, binary](absl::string_view file) { return file == binary || absl::StrContains(file, source); };
  cfg.contains_help_flags = ours;
  cfg.contains_helpshort_flags = ours;
  cfg.contains_helppackage_flags = ours;
  cfg.normalize_filename = [source, binary](absl::string_view file) {
    return absl::StrContains(file, source) ? binary : std::string(file);
  };
  absl::SetFlagsUsageConfig(cfg);
  absl::SetProgramUsageMessage(spec.usage);
}

}  // namespace

CommandLine ParseFlags(int argc, char** argv, const FlagsSpec& spec) {
  ConfigureUsage(spec);
  absl::flags_internal::SetProgramInvocationName(argv[0]);
  std::vector<std::string> args = NormalizeFlagNames(std::vector<std::string>(argv, argv + argc));
  HelpIfAsked(args, spec);
  if (!CheckFlags(spec.binary, args)) std::exit(2);
  CommandLine cl;
  for (const std::string& name : spec.repeatable) cl.repeated.emplace_back(name, RepeatedFlagValues(args, name));
  std::vector<char*> ptrs;
  for (std::string& a : args) ptrs.push_back(a.data());
  ptrs.push_back(nullptr);
  std::vector<char*> rest = absl::ParseCommandLine(argc, ptrs.data());
  for (size_t i = 1; i < rest.size(); ++i) cl.positional.emplace_back(rest[i]);
  return cl;
}

}  // namespace vkick
