// A simulated plant for the adaptive law: a discrete-event model of one
// virtqueue driven by a kick scheduler with batch threshold B and deferral
// bound T, in front of a device with fixed service time (infinite server:
// storage with internal parallelism). Workloads: a closed loop at queue depth
// q (each completion resubmits) or an open loop with Poisson arrivals at rate
// lambda. Each kick costs the submitting vCPU `kick_cost_ns` (the VM exit),
// during which it cannot submit; requests reach the device when the kick's
// exit is handled. Produces exactly the agent's per-interval QueueSample.
//
// With `event_idx` the driver runs event-idx:B,T: when a batch closes it asks
// the device (asks, suppressed in the sample). A sleeping device wants every
// kick; a `polling` one sees each request at its submission by itself (the
// avail ring is published at once) and declines every ask, so it gets no
// kick. Without event_idx a polling device still gets (and pays for) every
// plain kick.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <queue>
#include <random>
#include <vector>

#include "protocol/messages.h"

namespace vkick::sim {

struct PlantConfig {
  bool closed_loop = true;
  uint32_t qd = 1;                  // closed loop
  double lambda_per_s = 0;          // open loop
  uint64_t service_ns = 100'000;    // device latency per request
  uint64_t kick_cost_ns = 2'000;    // vCPU time per notification (exit)
  uint64_t submit_cost_ns = 500;    // vCPU time per submission
  uint64_t interval_ns = 20'000'000;
  uint64_t seed = 1;
  bool event_idx = false;  // the driver asks the device when a batch closes
  bool polling = false;    // the device polls the ring: declines every ask
};

struct IntervalResult {
  proto::QueueSample sample;
  uint64_t host_notifications = 0;  // what the host probes would count
  uint64_t max_added_ns = 0;        // longest submit -> kick wait
  double mean_latency_ns = 0;
};

class Plant {
 public:
  explicit Plant(PlantConfig c) : c_(c), rng_(c.seed) {
    if (!c_.closed_loop) next_arrival_ = Exp();
    else pending_submits_ = c_.qd;
  }

  void SetQd(uint32_t qd) {
    if (qd > c_.qd) pending_submits_ += qd - c_.qd;
    c_.qd = qd;
  }
  void SetLambda(double l) { c_.lambda_per_s = l; }

  // Runs one interval with (b, t_ns) in effect.
  IntervalResult Run(uint32_t b, uint64_t t_ns) {
    b_ = b;
    t_ns_ = t_ns;
    const uint64_t end = now_ + c_.interval_ns;
    IntervalResult r;
    auto& s = r.sample;
    s.ref = {0, 0};
    s.interval_ns = c_.interval_ns;
    uint64_t depth_sum = 0;
    double lat_sum = 0;
    // A policy switch flushes what the new (B, T) would not hold back; a
    // deadline armed under the previous T stays (the driver would keep it).
    if (!pending_.empty() && (b_ <= 1 || pending_.size() >= b_)) Kick(s, r, /*timer=*/false);
    for (;;) {
      // Next event: completion, timer, arrival/resubmission (vCPU permitting).
      uint64_t t_next = end;
      int kind = 0;  // 0 end, 1 completion, 2 timer, 3 submit
      if (!completions_.empty() && completions_.top().first < t_next) {
        t_next = completions_.top().first;
        kind = 1;
      }
      if (!pending_.empty() && b_ > 1 && timer_at_ < t_next) {
        t_next = timer_at_;
        kind = 2;
      }
      const uint64_t submit_at = NextSubmitTime();
      if (submit_at < t_next) {
        t_next = submit_at;
        kind = 3;
      }
      if (kind == 0) break;
      now_ = t_next;
      if (kind == 1) {
        const auto [at, submitted] = completions_.top();
        completions_.pop();
        --outstanding_;
        ++s.completed;
        const uint64_t lat = at - submitted;
        ++s.latency_hist[proto::LatencyBucket(lat)];
        lat_sum += static_cast<double>(lat);
        if (c_.closed_loop && outstanding_ + pending_submits_ < c_.qd) ++pending_submits_;
      } else if (kind == 2) {
        Kick(s, r, /*timer=*/true);
      } else {
        if (c_.closed_loop) --pending_submits_;
        else next_arrival_ += Exp();
        const uint64_t at = std::max(now_, cpu_free_);
        cpu_free_ = at + c_.submit_cost_ns;
        ++outstanding_;
        ++s.requests;
        depth_sum += outstanding_;
        s.max_depth = static_cast<uint16_t>(std::max<uint64_t>(s.max_depth, outstanding_));
        ++s.depth_hist[proto::DepthBucket(static_cast<uint32_t>(outstanding_))];
        if (pending_.empty()) timer_at_ = cpu_free_ + t_ns_;
        pending_.push_back(cpu_free_);
        // A polling device finds it in the avail ring without a kick.
        if (c_.polling) completions_.push({cpu_free_ + c_.service_ns, cpu_free_});
        if (pending_.size() >= b_ || b_ <= 1) Kick(s, r, /*timer=*/false);
      }
    }
    now_ = end;
    // A batch asked at the interval's start was submitted in the previous
    // one: clamped as the agent's BuildQueueSample does.
    s.asks = std::min(s.asks, s.requests);
    s.suppressed = std::min(s.suppressed, s.asks);
    if (s.requests) s.mean_depth_milli = static_cast<uint32_t>(depth_sum * 1000 / s.requests);
    r.host_notifications = s.kicks;
    r.mean_latency_ns = s.completed ? lat_sum / static_cast<double>(s.completed) : 0;
    s.lease = proto::LeaseState::kActive;
    s.applied_mode = c_.event_idx ? proto::KickMode::kEventIdx : proto::KickMode::kAdaptive;
    s.applied_batch = static_cast<uint16_t>(b);
    s.applied_defer_ns = static_cast<uint32_t>(t_ns);
    s.applied_generation = 1;
    return r;
  }

 private:
  uint64_t Exp() {
    std::exponential_distribution<double> d(c_.lambda_per_s / 1e9);
    return static_cast<uint64_t>(d(rng_)) + 1;
  }
  uint64_t NextSubmitTime() const {
    if (c_.closed_loop) return pending_submits_ ? std::max(now_, cpu_free_) : UINT64_MAX;
    return next_arrival_;  // it is submitted once the vCPU is free (Run)
  }
  void Kick(proto::QueueSample& s, IntervalResult& r, bool timer) {
    if (pending_.empty()) return;
    if (c_.event_idx) {
      ++s.asks;  // the batch is put to the device
      if (c_.polling) {  // declined: it already has them
        ++s.suppressed;
        pending_.clear();
        timer_at_ = UINT64_MAX;
        return;
      }
    }
    const uint64_t at = std::max(now_, cpu_free_);
    cpu_free_ = at + c_.kick_cost_ns;
    ++s.kicks;
    if (timer) ++s.timer_kicks;
    for (uint64_t submitted : pending_) {
      if (c_.polling) continue;  // at the device since its submission
      r.max_added_ns = std::max(r.max_added_ns, at - submitted);
      completions_.push({cpu_free_ + c_.service_ns, submitted});
    }
    pending_.clear();
    timer_at_ = UINT64_MAX;
  }

  PlantConfig c_;
  std::mt19937_64 rng_;
  uint64_t now_ = 0;
  uint64_t cpu_free_ = 0;
  uint64_t next_arrival_ = UINT64_MAX;
  uint32_t pending_submits_ = 0;   // closed loop: resubmissions owed
  uint64_t outstanding_ = 0;       // in the driver: pending + at the device
  std::vector<uint64_t> pending_;  // submit times of not-yet-kicked requests
  uint64_t timer_at_ = UINT64_MAX;
  uint32_t b_ = 1;
  uint64_t t_ns_ = 0;
  using Completion = std::pair<uint64_t, uint64_t>;  // (done at, submitted at)
  std::priority_queue<Completion, std::vector<Completion>, std::greater<>> completions_;
};

}  // namespace vkick::sim
