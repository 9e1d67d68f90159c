// The adaptive kick-batching law (docs/control.md): per queue, once per
// interval, host-counted notifications + the agent's sample -> batch
// threshold B and deferral bound T. Pure and clock-free: Step() is a function
// of its input and a little hysteresis state, so it is tested against a
// simulated plant (tests/unit/control) and restarts cleanly from any (B, T).
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string_view>

#include "absl/status/status.h"
#include "protocol/messages.h"

namespace vkick {

struct LawConfig {
  // Gate every kick with the device's own suppression (the driver asks
  // vring_need_event when a batch closes, or at each request with B = 1).
  // Off: the law batches with plain kicks (the action space before v3).
  bool event_idx = true;
  // The device declined at least this share of the asks in an interval: it
  // polls the ring (or never runs dry), so a grow cannot remove kicks and is
  // judged on latency alone (step 3).
  double polled_fraction = 0.8;
  uint32_t b_max = 64;                 // 1..proto::kMaxBatch
  uint64_t t_max_ns = 1'000'000;       // <= proto::kMaxDeferNs
  // B tracks this fraction of the requests outstanding in the driver: the
  // device keeps (1 - fraction) of the depth while a batch fills (vIC).
  double depth_fraction = 0.5;
  // T = defer_factor x the time B - 1 more arrivals take at the measured rate.
  double defer_factor = 2.0;
  // A higher level must be wanted this many consecutive intervals (>= 1).
  uint32_t grow_confirm = 2;
  // Shrink when fraction x depth falls below shrink_band x B (dead band).
  double shrink_band = 0.75;
  // Below this many requests in an interval the queue is idle: B = 1.
  uint64_t min_requests = 16;
  // More than this share of kicks fired by the timer: batches do not fill.
  double timer_kick_limit = 0.5;
  // A grow is kept only if notifications per request fell by more than this
  // (Linux DIM's 10% rule; not asked of a device that polled) and p99 stayed
  // within one histogram bucket of (p99 before + T).
  double min_gain = 0.10;
  // After a shrink for timers or a reverted grow, growth is capped at the
  // shrunk value for this many intervals.
  uint32_t ceiling_intervals = 8;
  // Park (no grows) for park_intervals after park_reversals changes of B
  // that reversed the previous change's direction, within park_window
  // intervals (up, down, up = 2 reversals).
  uint32_t park_reversals = 2;
  uint32_t park_window = 8;
  uint32_t park_intervals = 16;
  // The guest's kick count may differ from the host's by this share (or by
  // distrust_slack + B kicks, for interval-boundary skew) before its sample
  // is distrusted; after distrust_limit such intervals in a row, B = 1.
  double distrust_tolerance = 0.10;
  uint64_t distrust_slack = 4;
  uint32_t distrust_limit = 3;
};
absl::Status ValidateLawConfig(const LawConfig& c);

struct LawInput {
  // Notifications the host probes counted for this queue in the interval;
  // nullopt when no probe covers the queue (then the guest is believed).
  std::optional<uint64_t> host_notifications;
  uint64_t interval_ns = 0;
  uint64_t requests = 0;
  uint64_t kicks = 0;        // guest-reported
  uint64_t timer_kicks = 0;  // guest-reported: kicks fired by T
  double mean_depth = 0;     // requests outstanding in the driver at submit
  uint32_t max_depth = 0;
  uint64_t p50_ns = 0;
  uint64_t p99_ns = 0;
  // Event-idx decisions put to the device, and of those declined.
  uint64_t asks = 0;
  uint64_t suppressed = 0;
  // The (B, T) in effect during the interval (the sample's applied values).
  uint32_t b = 1;
  uint64_t t_ns = 0;
};
// Builds the input from a validated sample.
LawInput LawInputFromSample(const proto::QueueSample& s, std::optional<uint64_t> host_notifications);

enum class LawAction : uint8_t {
  kHold,         // nothing to change
  kPendingGrow,  // a higher level is wanted, awaiting confirmation
  kGrow,
  kShrink,       // depth fell: straight down to the level it supports
  kTimerShrink,  // batches did not fill before T: halve
  kRevert,       // the last grow did not pay (DIM)
  kParked,       // a grow was wanted but B oscillated recently
  kIdle,         // too few requests to batch: B = 1
  kDistrusted,   // the guest's kick count disagrees with the host's
};
std::string_view LawActionName(LawAction a);

struct LawOutput {
  // Kicks gated by event-idx (mode event-idx with B, T); false: plain kicks
  // (mode adaptive = static B, T), as after a persistent distrust.
  bool event_idx = true;
  uint32_t b = 1;
  uint64_t t_ns = 0;  // 0 iff b == 1; else proto::kMinDeferNs..t_max_ns
  LawAction action = LawAction::kHold;
  bool sample_trusted = true;
  double notifications_per_request = 0;  // from the trusted count
};

class AdaptiveLaw {
 public:
  explicit AdaptiveLaw(LawConfig config = {});
  LawOutput Step(const LawInput& in);

  bool parked() const { return interval_ < park_until_; }

 private:
  uint32_t LevelFor(double depth) const;
  uint64_t DeferFor(uint32_t b, const LawInput& in) const;
  bool Polled(const LawInput& in) const;
  LawOutput Finish(const LawInput& in, uint32_t b, LawAction action, double npr);
  void RecordChange(int dir);

  LawConfig c_;
  uint64_t interval_ = 0;
  uint32_t pending_grow_ = 0;     // consecutive intervals wanting a higher level
  uint32_t distrust_streak_ = 0;
  uint32_t ceiling_ = 0;          // 0: none
  uint64_t ceiling_until_ = 0;
  uint64_t park_until_ = 0;
  std::deque<std::pair<uint64_t, int>> changes_;  // (interval, +1/-1), last park_window
  // DIM-style evaluation of the last grow.
  struct GrowEval {
    uint32_t from_b, to_b;
    double npr_before;
    uint64_t p99_before;
    bool polled;         // the device declined most asks before the grow
    uint32_t waited;
    // The first sample reporting to_b ran partly under from_b (the policy
    // took effect somewhere inside its window): not judged, the next is.
    bool first_window_seen;
  };
  std::optional<GrowEval> eval_;
};

}  // namespace vkick
