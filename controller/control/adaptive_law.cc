#include "controller/control/adaptive_law.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace vkick {

absl::Status ValidateLawConfig(const LawConfig& c) {
  auto bad = [](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("adaptive law config: ", what));
  };
  if (c.b_max < 1 || c.b_max > proto::kMaxBatch)
    return bad(absl::StrCat("b_max must be 1..", proto::kMaxBatch));
  if (c.t_max_ns < proto::kMinDeferNs || c.t_max_ns > proto::kMaxDeferNs)
    return bad(absl::StrCat("t_max_ns must be ", proto::kMinDeferNs, "..", proto::kMaxDeferNs));
  if (!(c.depth_fraction > 0 && c.depth_fraction <= 1)) return bad("depth_fraction in (0, 1]");
  if (!(c.defer_factor >= 1 && c.defer_factor <= 16)) return bad("defer_factor in [1, 16]");
  if (c.grow_confirm < 1) return bad("grow_confirm >= 1");
  if (!(c.shrink_band > 0 && c.shrink_band <= 1)) return bad("shrink_band in (0, 1]");
  if (!(c.timer_kick_limit > 0 && c.timer_kick_limit <= 1)) return bad("timer_kick_limit in (0, 1]");
  if (!(c.min_gain >= 0 && c.min_gain < 1)) return bad("min_gain in [0, 1)");
  if (c.park_reversals < 1 || c.park_window <= c.park_reversals)
    return bad("park_reversals >= 1 and < park_window");
  if (!(c.distrust_tolerance >= 0 && c.distrust_tolerance < 1)) return bad("distrust_tolerance in [0, 1)");
  if (!(c.polled_fraction > 0 && c.polled_fraction <= 1)) return bad("polled_fraction in (0, 1]");
  if (c.distrust_limit < 1) return bad("distrust_limit >= 1");
  return absl::OkStatus();
}

LawInput LawInputFromSample(const proto::QueueSample& s,
                            std::optional<uint64_t> host_notifications) {
  LawInput in;
  in.host_notifications = host_notifications;
  in.interval_ns = s.interval_ns;
  in.requests = s.requests;
  in.kicks = s.kicks;
  in.timer_kicks = s.timer_kicks;
  in.mean_depth = s.mean_depth_milli / 1000.0;
  in.max_depth = s.max_depth;
  in.p50_ns = proto::LatencyQuantileNs(s.latency_hist, 0.50);
  in.p99_ns = proto::LatencyQuantileNs(s.latency_hist, 0.99);
  in.asks = s.asks;
  in.suppressed = s.suppressed;
  // Immediate decides per request: B = 1 whatever the fields say.
  const bool batching = s.applied_mode != proto::KickMode::kImmediate && s.applied_batch > 1;
  in.b = batching ? s.applied_batch : 1;
  in.t_ns = batching ? s.applied_defer_ns : 0;
  return in;
}

std::string_view LawActionName(LawAction a) {
  switch (a) {
    case LawAction::kHold: return "hold";
    case LawAction::kPendingGrow: return "pending_grow";
    case LawAction::kGrow: return "grow";
    case LawAction::kShrink: return "shrink";
    case LawAction::kTimerShrink: return "timer_shrink";
    case LawAction::kRevert: return "revert";
    case LawAction::kParked: return "parked";
    case LawAction::kIdle: return "idle";
    case LawAction::kDistrusted: return "distrusted";
  }
  return "unknown";
}

AdaptiveLaw::AdaptiveLaw(LawConfig config) : c_(config) {}

bool AdaptiveLaw::Polled(const LawInput& in) const {
  return c_.event_idx && in.asks >= c_.min_requests / 4 &&
         static_cast<double>(in.suppressed) >= c_.polled_fraction * static_cast<double>(in.asks);
}

// The profile table: powers of two up to b_max. Coarse levels are the first
// layer of hysteresis (DIM moves along a 5-entry table for the same reason).
uint32_t AdaptiveLaw::LevelFor(double depth) const {
  const double x = c_.depth_fraction * depth;
  uint32_t cap = c_.b_max;
  if (ceiling_ && interval_ < ceiling_until_) cap = std::min(cap, ceiling_);
  if (!(x >= 1.5)) return 1;  // also NaN
  // Round, then take the level below: x = 15.9 (depth 31.8 at QD 32) is 16.
  const uint32_t xi = x + 0.5 >= cap ? cap : static_cast<uint32_t>(x + 0.5);
  return std::max<uint32_t>(1, std::min(cap, std::bit_floor(xi)));
}

uint64_t AdaptiveLaw::DeferFor(uint32_t b, const LawInput& in) const {
  if (b <= 1) return 0;
  // Mean inter-arrival time; B - 1 more arrivals fill a batch on average.
  const double ia = static_cast<double>(in.interval_ns) / static_cast<double>(in.requests);
  double t = c_.defer_factor * (b - 1) * ia;
  t = std::clamp(t, static_cast<double>(proto::kMinDeferNs), static_cast<double>(c_.t_max_ns));
  // Keep the current T when the new one is within +-25%: arrival-rate noise
  // alone should not bump the policy generation every interval.
  if (in.b == b && in.t_ns >= proto::kMinDeferNs && in.t_ns <= c_.t_max_ns &&
      t >= 0.75 * in.t_ns && t <= 1.25 * in.t_ns)
    return in.t_ns;
  return static_cast<uint64_t>(t);
}

void AdaptiveLaw::RecordChange(int dir) {
  changes_.emplace_back(interval_, dir);
  while (!changes_.empty() && changes_.front().first + c_.park_window <= interval_)
    changes_.pop_front();
  uint32_t reversals = 0;
  for (size_t i = 1; i < changes_.size(); ++i)
    if (changes_[i].second != changes_[i - 1].second) ++reversals;
  if (reversals >= c_.park_reversals) {
    park_until_ = interval_ + c_.park_intervals;
    changes_.clear();
  }
}

LawOutput AdaptiveLaw::Finish(const LawInput& in, uint32_t b, LawAction action, double npr) {
  const uint32_t cur = std::clamp<uint32_t>(in.b, 1, c_.b_max);
  if (b != cur) RecordChange(b > cur ? +1 : -1);
  if (b < cur || action == LawAction::kIdle || action == LawAction::kDistrusted)
    pending_grow_ = 0;
  LawOutput out;
  out.event_idx = c_.event_idx && !(action == LawAction::kDistrusted && distrust_streak_ >= c_.distrust_limit);
  out.b = b;
  out.t_ns = (action == LawAction::kDistrusted && b == cur && b > 1)
                 ? std::clamp<uint64_t>(in.t_ns, proto::kMinDeferNs, c_.t_max_ns)
                 : (in.requests ? DeferFor(b, in) : 0);
  if (b == 1) out.t_ns = 0;
  out.action = action;
  out.notifications_per_request = npr;
  return out;
}

LawOutput AdaptiveLaw::Step(const LawInput& in) {
  ++interval_;
  const uint32_t b = std::clamp<uint32_t>(in.b, 1, c_.b_max);

  // 1. Trust. The host's count is ground truth; a guest that reports fewer
  //    (or more) kicks than the host saw is lying or broken, so its depth and
  //    timer figures are not used either.
  uint64_t notifications = in.kicks;
  if (in.host_notifications) {
    const uint64_t host = *in.host_notifications;
    const uint64_t diff = host > in.kicks ? host - in.kicks : in.kicks - host;
    const double tol = std::max(c_.distrust_slack + static_cast<double>(b),
                                c_.distrust_tolerance * static_cast<double>(host));
    if (static_cast<double>(diff) > tol) {
      eval_.reset();
      LawOutput out;
      if (++distrust_streak_ >= c_.distrust_limit) {
        // Persistently inconsistent: fall back to what the driver does
        // without vkick (no deferral, no added latency).
        out = Finish(in, 1, LawAction::kDistrusted, 0);
      } else {
        out = Finish(in, b, LawAction::kDistrusted, 0);  // hold, do not adapt on bad data
      }
      out.sample_trusted = false;
      return out;
    }
    distrust_streak_ = 0;
    notifications = host;
  }
  const double npr = in.requests ? static_cast<double>(notifications) / in.requests : 0;

  // 2. Idle or nearly: batches would fill slowly; kick at once.
  if (in.requests < c_.min_requests) {
    eval_.reset();
    return Finish(in, 1, LawAction::kIdle, npr);
  }

  // 3. Did the last grow pay (Linux DIM: keep a step only if it improved by
  //    more than 10%)? Judged on the first interval run entirely with the new
  //    B: the first sample that reports it ran the old B for part of its
  //    window (the policy arrives at a step, at any point of the agent's
  //    interval), so its notifications per request may not show the gain:
  //    judged, a good grow was reverted (seen in CI: B 1 -> 8 -> 1, then held
  //    at 1 by the ceiling).
  //    "Paid" is fewer notifications per request, unless the device was
  //    polling before the grow (it declined most asks): there were hardly
  //    any kicks to remove, the device already has every published request
  //    (the deferral adds no wait) and the batch only makes the driver's ask
  //    rarer. Then only the latency check judges: the request rate moved by
  //    +-50 % between 200 ms windows at a fixed depth on the 2-CPU testbed,
  //    too noisy to tell a grow that paid from one that did not.
  if (eval_ && b == eval_->to_b && !eval_->first_window_seen) {
    eval_->first_window_seen = true;
  } else if (eval_) {
    if (b == eval_->to_b) {
      const GrowEval e = *eval_;
      eval_.reset();
      const bool fewer = e.polled || npr < (1 - c_.min_gain) * e.npr_before;
      // p99 comes from power-of-two buckets: a deferral that legitimately
      // adds T moves it up one bucket (x2). More than that means the batch
      // starved the device.
      const bool latency_ok = in.p99_ns <= 2 * (e.p99_before + in.t_ns);
      if (!fewer || !latency_ok) {
        ceiling_ = e.from_b;
        ceiling_until_ = interval_ + c_.ceiling_intervals;
        return Finish(in, e.from_b, LawAction::kRevert, npr);
      }
    } else if (++eval_->waited > 2) {
      eval_.reset();  // the agent never applied it; nothing to judge
    }
  }

  // 4. Follow the depth: straight down (safe direction, fast), up only when
  //    confirmed over grow_confirm intervals and not parked.
  //    The depth a submission sees under batching B is biased low: a closed
  //    loop at depth q resubmits after each batch completes, so submissions
  //    see q - B + 1 .. q (mean q - (B - 1) / 2). Undo the bias the law itself
  //    causes, bounded by the largest depth actually seen; without this,
  //    QD 32 settles at B = 8 instead of 16.
  double depth = in.mean_depth + (b - 1) / 2.0;
  if (in.max_depth > 0) depth = std::min(depth, static_cast<double>(in.max_depth));
  const uint32_t level = LevelFor(depth);
  const bool depth_says_shrink = level < b && c_.depth_fraction * depth < c_.shrink_band * b;

  // 5. Batches closed by the timer: B is too large for the arrival rate.
  //    Halve (KVM halt-polling's shrink), or go lower if the depth says so.
  if (b > 1 && in.kicks >= 8 &&
      static_cast<double>(in.timer_kicks) > c_.timer_kick_limit * static_cast<double>(in.kicks)) {
    const uint32_t nb = std::max<uint32_t>(1, depth_says_shrink ? std::min(level, b / 2) : b / 2);
    ceiling_ = nb;
    ceiling_until_ = interval_ + c_.ceiling_intervals;
    return Finish(in, nb, LawAction::kTimerShrink, npr);
  }
  if (depth_says_shrink)
    return Finish(in, level, LawAction::kShrink, npr);
  if (level > b) {
    if (parked()) return Finish(in, b, LawAction::kParked, npr);
    if (++pending_grow_ < c_.grow_confirm) return Finish(in, b, LawAction::kPendingGrow, npr);
    // To the latest window's level: the first window that wants a grow after
    // a step up is partly the old depth, and the lower of the two would stop
    // at an intermediate level that costs a second grow and its judgement.
    const uint32_t nb = level;
    pending_grow_ = 0;
    eval_ = GrowEval{b, nb, npr, in.p99_ns, Polled(in), 0, false};
    return Finish(in, nb, LawAction::kGrow, npr);
  }
  pending_grow_ = 0;
  return Finish(in, b, LawAction::kHold, npr);
}

}  // namespace vkick
