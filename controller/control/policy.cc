#include "controller/control/policy.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/errno_status.h"

namespace vkick {
namespace {

constexpr absl::string_view kHeader = "# vkick policies v1";
constexpr size_t kMaxNameLen = 128;
constexpr size_t kMaxFileBytes = 1 << 20;  // 4096 entries x ~200 bytes, with room

absl::Status Errno(absl::string_view what, const std::string& path) {
  return ErrnoStatus(errno, absl::StrCat(what, " ", path));
}

// Label values are discovery's; still, the file is parsed back, so a tab or
// newline in a name would corrupt it. Reject anything unprintable.
bool ValidName(absl::string_view s) {
  if (s.size() > kMaxNameLen || s == "*") return false;
  for (char c : s)
    if (c <= 0x20 || c > 0x7e) return false;
  return true;
}

}  // namespace

absl::Status ValidatePolicySpec(const PolicySpec& p) {
  switch (p.mode) {
    case KickMode::kImmediate:
    case KickMode::kEventIdx:
      if (p.batch != 1 || p.defer_ns != 0)
        return absl::InvalidArgumentError("immediate/event-idx take no batch or defer");
      return absl::OkStatus();
    case KickMode::kStatic:
    case KickMode::kAdaptive:
      if (p.batch < 1 || p.batch > proto::kMaxBatch)
        return absl::InvalidArgumentError(absl::StrCat("batch must be 1..", proto::kMaxBatch));
      if (p.defer_ns > proto::kMaxDeferNs)
        return absl::InvalidArgumentError(
            absl::StrCat("defer must be <= ", proto::kMaxDeferNs / 1000, " us"));
      if (p.batch > 1 && p.defer_ns < proto::kMinDeferNs)
        return absl::InvalidArgumentError(
            absl::StrCat("a batch above 1 needs defer >= ", proto::kMinDeferNs / 1000,
                         " us (else a partial batch would wait forever)"));
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unknown mode");
}

absl::StatusOr<PolicySpec> ParsePolicySpec(absl::string_view text) {
  PolicySpec p;
  if (text == "immediate") return p;
  if (text == "event-idx") {
    p.mode = KickMode::kEventIdx;
    return p;
  }
  if (text == "adaptive") {
    p.mode = KickMode::kAdaptive;
    return p;
  }
  // static:B,T (T in us, an optional "us"): the syntax of vkick-blk and the
  // kernel driver. static:B:T is the older spelling, still read (state files).
  absl::string_view rest = text;
  rest.remove_suffix(absl::EndsWith(rest, "us") ? 2 : 0);
  std::vector<absl::string_view> parts = absl::StrSplit(rest, absl::ByAnyChar(":,"));
  uint32_t batch = 0;
  uint64_t defer_us = 0;
  if (parts.size() != 3 || parts[0] != "static" || !absl::SimpleAtoi(parts[1], &batch) ||
      !absl::SimpleAtoi(parts[2], &defer_us) || defer_us > proto::kMaxDeferNs / 1000)
    return absl::InvalidArgumentError(absl::StrCat(
        "bad policy '", text.substr(0, 64), "': want immediate, event-idx, adaptive or static:B,T (T in us)"));
  p.mode = KickMode::kStatic;
  p.batch = batch;
  p.defer_ns = defer_us * 1000;
  if (absl::Status s = ValidatePolicySpec(p); !s.ok()) return s;
  return p;
}

std::string FormatPolicySpec(const PolicySpec& p) {
  if (p.mode == KickMode::kStatic) return absl::StrCat("static:", p.batch, ",", p.defer_ns / 1000);
  return std::string(proto::KickModeName(p.mode));
}

absl::Status ValidatePolicyScope(const PolicyScope& s) {
  if (!s.vm.empty() && !ValidName(s.vm)) return absl::InvalidArgumentError("bad vm name");
  if (!s.device.empty() && !ValidName(s.device))
    return absl::InvalidArgumentError("bad device name");
  if (s.vm.empty() && !s.device.empty())
    return absl::InvalidArgumentError("a device scope needs its vm");
  if (s.queue < -1 || s.queue >= proto::kMaxQueuesPerDevice)
    return absl::InvalidArgumentError("queue out of range");
  if (s.queue >= 0 && s.device.empty())
    return absl::InvalidArgumentError("a queue scope needs its device");
  return absl::OkStatus();
}

absl::Status PolicyTable::Set(const PolicyScope& scope, const PolicySpec& spec) {
  if (absl::Status s = ValidatePolicyScope(scope); !s.ok()) return s;
  if (absl::Status s = ValidatePolicySpec(spec); !s.ok()) return s;
  if (scope == PolicyScope{}) {  // "all": the whole table's default
    default_ = spec;
    entries_.clear();
    return absl::OkStatus();
  }
  if (!entries_.contains(scope) && entries_.size() >= kMaxEntries)
    return absl::ResourceExhaustedError("too many policy entries");
  entries_[scope] = spec;
  return absl::OkStatus();
}

bool PolicyTable::Clear(const PolicyScope& scope) { return entries_.erase(scope) > 0; }

PolicySpec PolicyTable::Resolve(absl::string_view vm, absl::string_view device,
                                uint16_t queue) const {
  const PolicyScope candidates[] = {
      {std::string(vm), std::string(device), queue},
      {std::string(vm), std::string(device), -1},
      {std::string(vm), "", -1},
  };
  for (const PolicyScope& s : candidates)
    if (auto it = entries_.find(s); it != entries_.end()) return it->second;
  return default_;
}

std::string SerializePolicies(const PolicyTable& table) {
  std::string out = absl::StrCat(kHeader, "\n");
  for (const auto& [scope, spec] : table.entries()) {
    absl::StrAppend(&out, "policy\t", scope.vm.empty() ? "*" : scope.vm, "\t",
                    scope.device.empty() ? "*" : scope.device, "\t",
                    scope.queue < 0 ? std::string("*") : absl::StrCat(scope.queue), "\t",
                    FormatPolicySpec(spec), "\n");
  }
  return out;
}

absl::Status ParsePolicies(absl::string_view text, PolicyTable& table) {
  if (text.size() > kMaxFileBytes) return absl::DataLossError("policy file too large");
  std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
  if (lines.empty() || lines[0] != kHeader)
    return absl::DataLossError("policy file: missing header line");
  if (!lines.back().empty()) return absl::DataLossError("policy file: truncated last line");
  PolicyTable parsed(table.default_policy());
  for (size_t i = 1; i + 1 < lines.size(); ++i) {
    auto fail = [&](absl::string_view why) {
      return absl::DataLossError(absl::StrCat("policy file line ", i + 1, ": ", why));
    };
    std::vector<absl::string_view> f = absl::StrSplit(lines[i], '\t');
    if (f.size() != 5 || f[0] != "policy") return fail("want policy<TAB>vm<TAB>dev<TAB>q<TAB>spec");
    PolicyScope scope;
    scope.vm = f[1] == "*" ? "" : std::string(f[1]);
    scope.device = f[2] == "*" ? "" : std::string(f[2]);
    if (f[3] != "*" && (!absl::SimpleAtoi(f[3], &scope.queue) || scope.queue < 0))
      return fail("bad queue");
    if (scope == PolicyScope{}) return fail("an entry for all queues belongs in the flag");
    absl::StatusOr<PolicySpec> spec = ParsePolicySpec(f[4]);
    if (!spec.ok()) return fail(spec.status().message());
    if (parsed.entries().contains(scope)) return fail("duplicate entry");
    if (absl::Status s = parsed.Set(scope, *spec); !s.ok()) return fail(s.message());
  }
  table = std::move(parsed);
  return absl::OkStatus();
}

std::string PolicyStore::path() const { return absl::StrCat(dir_, "/", kFileName); }

absl::Status PolicyStore::Save(const PolicyTable& table) const {
  const std::string data = SerializePolicies(table);
  const std::string final_path = path();
  const std::string tmp = absl::StrCat(final_path, ".tmp.", getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Errno("create", tmp);
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      absl::Status s = Errno("write", tmp);
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    off += static_cast<size_t>(n);
  }
  // Data on disk before the rename makes it visible; the directory fsync
  // makes the rename itself durable.
  if (::fsync(fd) != 0) {
    absl::Status s = Errno("fsync", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    absl::Status s = Errno("rename", tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  if (const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

PolicyStore::Loaded PolicyStore::Load(PolicySpec default_policy) const {
  Loaded out{PolicyTable(default_policy), absl::OkStatus()};
  const std::string p = path();
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT) out.status = Errno("open", p);
    return out;
  }
  std::string data;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      out.status = Errno("read", p);
      ::close(fd);
      return out;
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > kMaxFileBytes) break;  // ParsePolicies rejects it
  }
  ::close(fd);
  if (absl::Status s = ParsePolicies(data, out.table); !s.ok()) {
    const std::string aside = absl::StrCat(p, ".corrupt");
    ::rename(p.c_str(), aside.c_str());
    out.status = absl::DataLossError(absl::StrCat(
        s.message(), " (", p, " moved to ", aside, "; using the default policy)"));
  }
  return out;
}

}  // namespace vkick
