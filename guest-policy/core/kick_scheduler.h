// The kick path as a policy (the seed's "defer the kick to a taskqueue").
// Pure: time comes in as arguments (from a Clock), the caller does the kick.
//
//   immediate        kick after every submit (one kick per request)
//   event-idx        ask the ring: kick iff vring_need_event(avail_event, new,
//                    old), or the used ring's NO_NOTIFY flag without EVENT_IDX
//   static:B,T       kick when B requests are pending since the last kick, or
//                    when the oldest pending one is T old, whichever first. The
//                    T kick is deferred: it is issued by OnPoll() on the
//                    queue's poller loop (the "taskqueue"), so no submitter
//                    ever waits for it.
//   event-idx:B,T    both: a batch closes as in static:B,T, and then the
//                    device is asked, as in event-idx. A polling backend
//                    that wants no kicks gets none; a sleeping one gets one
//                    per batch.
//   adaptive         the mode, B and T from the control block with a lease
//                    (AdaptiveSource); expired, absent or invalid: immediate.
//
// Invariant (tested): with polls at most P apart, no request stays pending
// (published, neither kicked nor put to the device) longer than T + P; a
// policy change kicks what is pending at once, so nothing is stranded by a
// switch. A request the device declined to be told about is its promise
// (virtio 1.2, 2.7.10) to look by itself.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "guest-policy/core/control_block.h"

namespace vkick {

enum class KickMode : uint8_t { kImmediate = 0, kEventIdx = 1, kStatic = 2, kAdaptive = 3 };
const char* KickModeName(KickMode m);

// Why a kick was issued: the USDT probe's `why` argument.
enum class KickWhy : uint8_t {
  kImmediate = 0,
  kEventIdx = 1,
  kBatchFull = 2,
  kTimer = 3,
  kPolicyChange = 4,
  kRingFull = 5,  // the submitter cannot add more: kick what is queued
};
const char* KickWhyName(KickWhy w);

struct KickPolicy {
  KickMode mode = KickMode::kImmediate;
  uint32_t batch = 1;     // static, event-idx: B (1 = no batching)
  uint64_t defer_ns = 0;  // static, event-idx: T
  // Requests wait for a batch to close (B > 1) before their kick.
  bool Defers() const { return (mode == KickMode::kStatic || mode == KickMode::kEventIdx) && batch > 1; }
  friend bool operator==(const KickPolicy&, const KickPolicy&) = default;
};

inline constexpr uint64_t kMaxDeferNs = kControlMaxDeferNs;  // 1 ms

// "immediate", "event-idx", "adaptive", "static:B,T", "event-idx:B,T" where
// T is a number with an optional unit ns|us|ms (default us), e.g.
// "static:32,50us". B must be 1..queue_size, T <= 1 ms.
absl::StatusOr<KickPolicy> ParseKickPolicy(absl::string_view text, uint32_t queue_size);
std::string FormatKickPolicy(const KickPolicy& p);

class KickScheduler {
 public:
  enum class Action : uint8_t { kNone, kKick, kAskDevice };
  struct Decision {
    Action action = Action::kNone;
    KickWhy why = KickWhy::kImmediate;
  };

  // `policy.mode` must not be kAdaptive: pass the effective policy.
  explicit KickScheduler(KickPolicy policy) : policy_(policy) {}

  // A request was published in the avail ring at `now_ns`.
  Decision OnSubmit(uint64_t now_ns);
  // The poller loop's turn: fires the deferred kick when it is due.
  Decision OnPoll(uint64_t now_ns);
  // Switch policy; pending requests are kicked at once.
  Decision SetPolicy(const KickPolicy& p);
  // The caller could not add more requests (ring full): kick the pending ones.
  Decision OnRingFull();

  // Report what the caller did with a kKick / kAskDevice decision.
  void Kicked();     // notified the device: nothing is pending any more
  void Suppressed(); // event-idx said the device will look by itself

  uint32_t pending() const { return pending_; }
  // When the deferred kick is due (nullopt: nothing pending).
  std::optional<uint64_t> deadline_ns() const;
  const KickPolicy& policy() const { return policy_; }

 private:
  // A batch closed: kick it, or ask the device first (event-idx).
  Decision Close(KickWhy why) const;

  KickPolicy policy_;
  uint32_t pending_ = 0;
  uint64_t oldest_ns_ = 0;
};

// The adaptive policy's source of (B, T): the control block with its lease.
class AdaptiveSource {
 public:
  AdaptiveSource(const ControlBlock* cb, uint16_t queue, uint32_t queue_size)
      : cb_(cb), queue_(queue), queue_size_(queue_size) {}

  // The policy to run now: static(B,T) or event-idx / immediate as the agent
  // says while its lease holds; immediate otherwise (the safe fallback).
  KickPolicy Effective(uint64_t now_ns);

  // The agent's block was (re)mapped or dropped (nullptr: absent, fallback).
  void set_block(const ControlBlock* cb) { cb_ = cb; }

  ControlReadError last_error() const { return last_error_; }
  uint64_t fallbacks() const { return fallbacks_; }  // transitions to fallback
  bool leased() const { return leased_; }

 private:
  const ControlBlock* cb_;
  uint16_t queue_;
  uint32_t queue_size_;
  std::optional<ControlSnapshot> last_good_;
  ControlReadError last_error_ = ControlReadError::kNone;
  uint64_t fallbacks_ = 0;
  bool leased_ = false;
};

}  // namespace vkick
