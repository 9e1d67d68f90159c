#include "agent/vkick_disks.h"

#include <algorithm>
#include <span>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "agent/sysfs_file.h"

namespace vkick::agent {
namespace {

constexpr uint64_t kNsPerMs = 1'000'000;

// A decimal u64 as the module prints it: digits only (no sign, no space), no
// overflow.
bool ParseU64(absl::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  return absl::SimpleAtoi(s, out);
}

// Where each documented key's values go; the span's size is their count.
std::vector<std::pair<absl::string_view, std::span<uint64_t>>> Slots(VkickQueueStats& s) {
  QueueTotals& t = s.totals;
  auto one = [](uint64_t& v) { return std::span<uint64_t>(&v, 1); };
  return {{"requests", one(t.requests)},       {"completions", one(t.completions)},
          {"kicks", one(t.kicks)},             {"timer_kicks", one(s.timer_kicks)},
          {"asks", one(t.asks)},               {"suppressed", one(t.suppressed)},
          {"depth_sum", one(t.depth_sum)},     {"latency_sum_ns", one(t.latency_sum_ns)},
          {"kicks_by_why", t.kicks_by_why},    {"depth_hist", t.depth_hist},
          {"latency_hist", t.latency_hist},    {"depth_limit", one(s.depth_limit)},
          {"inflight", one(s.inflight)},       {"rejected_writes", one(s.rejected_writes)}};
}

}  // namespace

std::optional<VkickQueueStats> ParseVkickQueueStats(absl::string_view text) {
  VkickQueueStats s;
  const auto slots = Slots(s);
  std::vector<bool> seen(slots.size(), false);
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    const std::vector<absl::string_view> f = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    auto it = std::find_if(slots.begin(), slots.end(), [&](const auto& slot) { return slot.first == f[0]; });
    if (it == slots.end()) continue;  // a key of a newer module
    const size_t i = static_cast<size_t>(it - slots.begin());
    if (seen[i] || f.size() != it->second.size() + 1) return std::nullopt;
    seen[i] = true;
    for (size_t v = 0; v < it->second.size(); ++v)
      if (!ParseU64(f[v + 1], &it->second[v])) return std::nullopt;
  }
  if (std::find(seen.begin(), seen.end(), false) != seen.end()) return std::nullopt;
  return s;
}

std::string SteerLine(const proto::QueuePolicy& p) {
  // The module's mode words are the protocol's names.
  const proto::KickMode mode = p.mode == proto::KickMode::kAdaptive ? proto::KickMode::kStatic : p.mode;
  const uint64_t lease_ms = std::clamp<uint64_t>(p.lease_ns / kNsPerMs + (p.lease_ns % kNsPerMs != 0),
                                                 proto::kMinLeaseNs / kNsPerMs, proto::kMaxLeaseNs / kNsPerMs);
  return absl::StrCat(p.generation, " ", std::string(proto::KickModeName(mode)), " ", p.batch, " ", p.defer_ns, " ", lease_ms,
                      "\n");
}

std::string VkickQueueDir(const std::string& sysfs_root, const std::string& disk, uint16_t queue) {
  return absl::StrCat(sysfs_root, "/block/", disk, "/vkick/q", queue);
}

absl::Status WriteSteer(const std::string& sysfs_root, const std::string& disk, const proto::QueuePolicy& p) {
  return WriteSysfsFile(VkickQueueDir(sysfs_root, disk, p.ref.queue_index) + "/steer", SteerLine(p));
}

std::map<uint16_t, QueueTotals> VkickDiskStats::Read(const KernelDisk& disk) {
  std::map<uint16_t, QueueTotals> out;
  const uint32_t kdev = KernelDevOf(disk);
  for (uint16_t q = 0; q < disk.num_queues; ++q) {
    std::string text;
    std::optional<VkickQueueStats> s;
    if (ReadSysfsFile(VkickQueueDir(root_, disk.name, q) + "/stats", kMaxVkickStatsBytes, &text))
      s = ParseVkickQueueStats(text);
    if (!s) {
      ++unreadable_;
      continue;
    }
    QueueTotals& last = last_[{kdev, q}];
    QueueTotals t = s->totals;
    t.interval_max_depth = DepthHistMax(Delta(last, t).depth_hist, s->depth_limit);
    last = t;
    out[q] = t;
  }
  return out;
}

void VkickDiskStats::Forget(uint32_t kdev) {
  last_.erase(last_.lower_bound({kdev, 0}), last_.upper_bound({kdev, UINT16_MAX}));
}

}  // namespace vkick::agent
