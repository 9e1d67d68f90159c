#include "guest-policy/core/kick_scheduler.h"

#include <charconv>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace vkick {

const char* KickModeName(KickMode m) {
  switch (m) {
    case KickMode::kImmediate: return "immediate";
    case KickMode::kEventIdx: return "event-idx";
    case KickMode::kStatic: return "static";
    case KickMode::kAdaptive: return "adaptive";
  }
  return "?";
}

const char* KickWhyName(KickWhy w) {
  switch (w) {
    case KickWhy::kImmediate: return "immediate";
    case KickWhy::kEventIdx: return "event-idx";
    case KickWhy::kBatchFull: return "batch-full";
    case KickWhy::kTimer: return "timer";
    case KickWhy::kPolicyChange: return "policy-change";
    case KickWhy::kRingFull: return "ring-full";
  }
  return "?";
}

namespace {
// "B,T" of static:B,T and event-idx:B,T.
absl::StatusOr<KickPolicy> ParseBatch(KickMode mode, absl::string_view text, absl::string_view args,
                                      uint32_t queue_size) {
  std::vector<absl::string_view> parts = absl::StrSplit(args, ',');
  if (parts.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("policy '", text, "': want ", KickModeName(mode), ":B,T"));
  }
  uint32_t b = 0;
  if (!absl::SimpleAtoi(parts[0], &b) || b < 1 || b > queue_size) {
    return absl::InvalidArgumentError(absl::StrCat("policy '", text, "': B must be 1..", queue_size));
  }
  absl::string_view t = parts[1];
  uint64_t mult = 1000;  // default unit: us
  if (t.size() > 2 && t.substr(t.size() - 2) == "ns") { mult = 1; t.remove_suffix(2); }
  else if (t.size() > 2 && t.substr(t.size() - 2) == "us") { mult = 1000; t.remove_suffix(2); }
  else if (t.size() > 2 && t.substr(t.size() - 2) == "ms") { mult = 1'000'000; t.remove_suffix(2); }
  uint64_t tv = 0;
  if (!absl::SimpleAtoi(t, &tv) || tv > kMaxDeferNs / mult || tv * mult > kMaxDeferNs) {
    return absl::InvalidArgumentError(absl::StrCat("policy '", text, "': T must be a duration <= 1ms"));
  }
  if (b == 1) tv = 0;  // nothing ever waits for a batch of one
  return KickPolicy{mode, b, tv * mult};
}
}  // namespace

absl::StatusOr<KickPolicy> ParseKickPolicy(absl::string_view text, uint32_t queue_size) {
  if (text == "immediate") return KickPolicy{KickMode::kImmediate, 1, 0};
  if (text == "event-idx") return KickPolicy{KickMode::kEventIdx, 1, 0};
  if (text == "adaptive") return KickPolicy{KickMode::kAdaptive, 1, 0};
  for (KickMode m : {KickMode::kStatic, KickMode::kEventIdx}) {
    const std::string prefix = absl::StrCat(KickModeName(m), ":");
    if (absl::StartsWith(text, prefix)) return ParseBatch(m, text, text.substr(prefix.size()), queue_size);
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy '", text, "' (want immediate|event-idx|static:B,T|event-idx:B,T|adaptive)"));
}

std::string FormatKickPolicy(const KickPolicy& p) {
  if (p.mode == KickMode::kStatic || (p.mode == KickMode::kEventIdx && p.batch > 1)) {
    return absl::StrCat(KickModeName(p.mode), ":", p.batch, ",", p.defer_ns, "ns");
  }
  return KickModeName(p.mode);
}

KickScheduler::Decision KickScheduler::OnSubmit(uint64_t now_ns) {
  if (pending_ == 0) oldest_ns_ = now_ns;
  ++pending_;
  switch (policy_.mode) {
    case KickMode::kImmediate:
    case KickMode::kAdaptive:  // never configured directly; be safe
      return {Action::kKick, KickWhy::kImmediate};
    case KickMode::kEventIdx:
      if (policy_.batch <= 1) return {Action::kAskDevice, KickWhy::kEventIdx};
      [[fallthrough]];
    case KickMode::kStatic:
      if (pending_ >= policy_.batch) return Close(KickWhy::kBatchFull);
      if (now_ns - oldest_ns_ >= policy_.defer_ns) return Close(KickWhy::kTimer);
      return {};
  }
  return {Action::kKick, KickWhy::kImmediate};
}

KickScheduler::Decision KickScheduler::OnPoll(uint64_t now_ns) {
  if (pending_ == 0) return {};
  if (!policy_.Defers()) {
    // Other modes resolve at submit; anything left (should not happen) goes now.
    return {Action::kKick, KickWhy::kImmediate};
  }
  if (now_ns - oldest_ns_ >= policy_.defer_ns) return Close(KickWhy::kTimer);
  return {};
}

KickScheduler::Decision KickScheduler::Close(KickWhy why) const {
  return {policy_.mode == KickMode::kEventIdx ? Action::kAskDevice : Action::kKick, why};
}

KickScheduler::Decision KickScheduler::SetPolicy(const KickPolicy& p) {
  if (p == policy_) return {};
  policy_ = p;
  if (policy_.mode == KickMode::kAdaptive) policy_ = {KickMode::kImmediate, 1, 0};
  if (pending_ > 0) return {Action::kKick, KickWhy::kPolicyChange};
  return {};
}

KickScheduler::Decision KickScheduler::OnRingFull() {
  if (pending_ > 0) return {Action::kKick, KickWhy::kRingFull};
  return {};
}

void KickScheduler::Kicked() { pending_ = 0; }
void KickScheduler::Suppressed() { pending_ = 0; }

std::optional<uint64_t> KickScheduler::deadline_ns() const {
  if (pending_ == 0) return std::nullopt;
  if (!policy_.Defers()) return oldest_ns_;
  return oldest_ns_ + policy_.defer_ns;
}

KickPolicy AdaptiveSource::Effective(uint64_t now_ns) {
  ControlReadResult r = ReadControlBlock(cb_, queue_, queue_size_);
  last_error_ = r.error;
  if (r.snapshot.has_value()) {
    last_good_ = r.snapshot;
  } else if (r.error != ControlReadError::kBusy) {
    last_good_.reset();  // invalid or gone: do not keep trusting an old value
  }
  const bool ok = last_good_.has_value() && last_good_->lease_expiry_ns > now_ns;
  if (leased_ && !ok) ++fallbacks_;
  leased_ = ok;
  if (!ok) return {KickMode::kImmediate, 1, 0};
  switch (last_good_->mode) {
    case ControlMode::kEventIdx: return {KickMode::kEventIdx, last_good_->batch, last_good_->defer_ns};
    case ControlMode::kStatic:
    case ControlMode::kAdaptive: return {KickMode::kStatic, last_good_->batch, last_good_->defer_ns};
    case ControlMode::kImmediate: break;
  }
  return {KickMode::kImmediate, 1, 0};
}

}  // namespace vkick
