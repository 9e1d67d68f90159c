// Kick policies per VM / device / queue (docs/control.md, "Policy model"),
// and their persistence in vkickd's state directory so a restart restores
// them. A queue's policy is the most specific entry that covers it:
// queue > device > VM > the default (--default_policy).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "protocol/messages.h"

namespace vkick {

using KickMode = proto::KickMode;

struct PolicySpec {
  KickMode mode = KickMode::kImmediate;
  // static: the fixed B and T. adaptive: the starting point and nothing more.
  // immediate / event-idx: always 1 and 0.
  uint32_t batch = 1;
  uint64_t defer_ns = 0;
  friend bool operator==(const PolicySpec&, const PolicySpec&) = default;
};
// The protocol's rules (batch 1..kMaxBatch, defer <= kMaxDeferNs, a batch
// above 1 needs defer >= kMinDeferNs, immediate/event-idx are 1/0).
absl::Status ValidatePolicySpec(const PolicySpec& p);

// "immediate", "event-idx", "adaptive", "static:B,T" (T in us, e.g.
// "static:8,50"): the syntax of vkick-blk --policy, of the kernel driver's
// sysfs and of the --default_policy flag and the state file. "static:8:50"
// (the older spelling) is still read.
absl::StatusOr<PolicySpec> ParsePolicySpec(absl::string_view text);
std::string FormatPolicySpec(const PolicySpec& p);

// Which queues an entry covers: an empty vm/device or queue -1 is "all".
// VM and device are discovery's label values (never guest-supplied).
struct PolicyScope {
  std::string vm;
  std::string device;
  int32_t queue = -1;
  auto operator<=>(const PolicyScope&) const = default;
};
absl::Status ValidatePolicyScope(const PolicyScope& s);

class PolicyTable {
 public:
  static constexpr size_t kMaxEntries = 4096;

  explicit PolicyTable(PolicySpec default_policy = {}) : default_(default_policy) {}

  absl::Status Set(const PolicyScope& scope, const PolicySpec& spec);
  // Removes exactly that entry (the queue falls back to a wider one).
  bool Clear(const PolicyScope& scope);
  PolicySpec Resolve(absl::string_view vm, absl::string_view device, uint16_t queue) const;

  const PolicySpec& default_policy() const { return default_; }
  const std::map<PolicyScope, PolicySpec>& entries() const { return entries_; }
  friend bool operator==(const PolicyTable&, const PolicyTable&) = default;

 private:
  PolicySpec default_;
  std::map<PolicyScope, PolicySpec> entries_;
};

// Persists a PolicyTable's entries (not the default: that is a flag) to
// <state_dir>/policies.v1. Save is atomic (tmp file, fsync, rename, fsync of
// the directory): a crash leaves the old or the new file, never half of one.
class PolicyStore {
 public:
  static constexpr absl::string_view kFileName = "policies.v1";

  explicit PolicyStore(std::string state_dir) : dir_(std::move(state_dir)) {}

  absl::Status Save(const PolicyTable& table) const;

  struct Loaded {
    PolicyTable table;     // always usable: the defaults if the file was bad
    absl::Status status;   // OK, or why the file was ignored
  };
  // A missing file is OK (first start). A corrupt one is moved aside to
  // policies.v1.corrupt (kept for the operator) and reported in `status`;
  // the table is then just the default. Never crashes on any file content.
  Loaded Load(PolicySpec default_policy) const;

  std::string path() const;

 private:
  std::string dir_;
};

// The file format, exposed for tests: a header line, then one line per entry
// "policy<TAB>vm<TAB>device<TAB>queue|*<TAB>spec" (empty vm/device: "*").
std::string SerializePolicies(const PolicyTable& table);
absl::Status ParsePolicies(absl::string_view text, PolicyTable& table);

}  // namespace vkick
