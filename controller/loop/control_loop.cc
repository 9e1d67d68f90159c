#include "controller/loop/control_loop.h"

#include <algorithm>
#include <utility>

namespace vkick {

const char* PolicySourceName(PolicySource s) {
  switch (s) {
    case PolicySource::kDefault: return "default";
    case PolicySource::kVm: return "vm";
    case PolicySource::kDevice: return "device";
    case PolicySource::kQueue: return "queue";
  }
  return "default";
}

std::pair<PolicySpec, PolicySource> ResolveWithSource(const PolicyTable& table,
                                                      const QueueKey& key) {
  const auto& e = table.entries();
  if (auto it = e.find(PolicyScope{key.vm, key.device, key.queue}); it != e.end())
    return {it->second, PolicySource::kQueue};
  if (auto it = e.find(PolicyScope{key.vm, key.device, -1}); it != e.end())
    return {it->second, PolicySource::kDevice};
  if (auto it = e.find(PolicyScope{key.vm, "", -1}); it != e.end())
    return {it->second, PolicySource::kVm};
  return {table.default_policy(), PolicySource::kDefault};
}

const std::vector<double>& DepthBucketBounds() {
  // Bucket 0: depth 1; bucket i (1..8): [2^i, 2^(i+1)) -> le 2^(i+1) - 1
  // (depths are integers); bucket 9 (>= 512): +Inf.
  static const auto* const kB = [] {
    auto* v = new std::vector<double>{1};
    for (int i = 1; i <= 8; ++i) v->push_back((1 << (i + 1)) - 1);
    return v;
  }();
  return *kB;
}

const std::vector<double>& LatencyBucketBoundsSeconds() {
  // Bucket 0: < 1 us; bucket i (1..14): [2^(i-1), 2^i) us; bucket 15: +Inf.
  static const auto* const kB = [] {
    auto* v = new std::vector<double>{1e-6};
    for (int i = 1; i <= 14; ++i) v->push_back((1 << i) * 1e-6);
    return v;
  }();
  return *kB;
}

namespace {

// Midpoint of a latency bucket in seconds (for the histogram's _sum, which
// the protocol does not carry).
double LatencyMidSeconds(size_t bucket) {
  if (bucket == 0) return 0.5e-6;
  double lo = (1ull << (bucket - 1)) * 1e-6;
  return bucket + 1 == proto::kLatencyBuckets ? 2 * lo * 0.75 : lo * 1.5;
}

// Modes whose B and T the driver applies (event-idx batches when B > 1).
bool Batching(proto::KickMode m) { return m != proto::KickMode::kImmediate; }

// A sample's cumulative data (requests, kicks, histograms) into the view.
void AddToTotals(QueueView& v, const proto::QueueSample& s) {
  v.requests_total += s.requests;
  v.guest_kicks_total += s.kicks;
  v.timer_kicks_total += s.timer_kicks;
  v.completed_total += s.completed;
  for (size_t i = 0; i < proto::kDepthBuckets; ++i) v.depth_hist[i] += s.depth_hist[i];
  for (size_t i = 0; i < proto::kLatencyBuckets; ++i) {
    v.latency_hist[i] += s.latency_hist[i];
    v.latency_sum_s += s.latency_hist[i] * LatencyMidSeconds(i);
  }
  v.depth_sum += s.mean_depth_milli / 1000.0 * s.requests;
}

}  // namespace

ControlLoop::ControlLoop(LoopConfig config, uint64_t generation_base)
    : config_(std::move(config)), next_generation_(generation_base + 1) {}

void ControlLoop::OnAck(const QueueKey& key, uint64_t generation) {
  auto it = queues_.find(key);
  if (it == queues_.end()) return;
  QueueView& v = it->second.view;
  // Generations come from one counter and every policy message carries all
  // of an agent's queues, so an ack of g (the message's highest generation)
  // covers each queue whose current generation is <= g. A generation never
  // issued (the future) is ignored.
  if (generation >= next_generation_) return;
  if (v.generation != 0 && v.generation <= generation) v.acked_generation = v.generation;
}

std::vector<PolicyOut> ControlLoop::Step(const PolicyTable& table,
                                         const std::vector<QueueInput>& inputs, int64_t now_ns) {
  std::map<QueueKey, State> next;
  for (const QueueInput& in : inputs) {
    auto it = queues_.find(in.key);
    State st;
    if (it != queues_.end()) st = std::move(it->second);
    st.view.key = in.key;
    StepQueue(st, table, in, now_ns);
    next[in.key] = std::move(st);  // a duplicate key: the later input wins
  }
  queues_ = std::move(next);

  std::vector<PolicyOut> out;
  for (const auto& [key, st] : queues_) {
    const QueueView& v = st.view;
    if (!v.agent_connected || v.observe_only || v.frozen) continue;
    PolicyOut p;
    p.key = key;
    p.mode = v.mode;
    p.batch = static_cast<uint16_t>(v.b);
    p.defer_ns = static_cast<uint32_t>(v.t_ns);
    p.lease_ns = config_.lease_ns;
    p.generation = v.generation;
    out.push_back(std::move(p));
  }
  return out;
}

void ControlLoop::StepQueue(State& st, const PolicyTable& table, const QueueInput& in,
                            int64_t now_ns) {
  QueueView& v = st.view;
  v.frozen = in.frozen;
  v.vm_state = in.vm_state;
  if (in.frozen && st.initialised) {
    // The law holds: nothing is learnt from the absence of samples. The
    // agent may still come or go (a migration's new channel): that is shown.
    v.agent_connected = in.agent_connected;
    // A sample sent just before the guest stopped still counts in the
    // totals (the histograms and counters): it only steers nothing.
    if (in.sample) AddToTotals(v, *in.sample);
    HoldFrozen(st, now_ns);
    if (in.host_notifications_total) st.host_prev = *in.host_notifications_total;
    auto [spec, source] = ResolveWithSource(table, in.key);
    if (spec == v.spec && source == v.source) return;
    // An operator changed the policy meanwhile: taken now (status shows
    // it, with a new generation), sent at the resume. As a Step without a
    // sample, and without a lease expiry: the guest has not run.
    QueueInput change = in;
    change.frozen = false;
    change.sample.reset();
    change.agent_connected = true;
    StepQueue(st, table, change, now_ns);
    v.frozen = true;
    v.agent_connected = in.agent_connected;
    HoldFrozen(st, now_ns);
    return;
  }
  auto [spec, source] = ResolveWithSource(table, in.key);
  const bool mode_changed = !st.initialised || spec.mode != v.spec.mode;
  const bool spec_changed = !st.initialised || !(spec == v.spec);
  v.agent_connected = in.agent_connected;
  v.observe_only = in.observe_only;
  v.driver = in.driver;
  bool new_connection = false;
  if (in.agent_connection != 0) {
    new_connection = st.agent_connection != 0 && in.agent_connection != st.agent_connection;
    st.agent_connection = in.agent_connection;
  }

  // Host rate over the last Step.
  if (in.host_notifications_total) {
    uint64_t total = *in.host_notifications_total;
    if (st.host_prev && st.last_step_ns && now_ns > *st.last_step_ns) {
      uint64_t d = total >= *st.host_prev ? total - *st.host_prev : total;  // reset
      v.notifications_per_s = d / ((now_ns - *st.last_step_ns) / 1e9);
    }
    st.host_prev = total;
  } else {
    st.host_prev.reset();
  }
  st.last_step_ns = now_ns;

  // The sample: cumulative data, rates, and the law's input.
  std::optional<uint64_t> host_delta;
  if (in.sample) {
    const proto::QueueSample& s = *in.sample;
    if (in.host_notifications_total) {
      const bool stamped = in.host_notifications_at_sample.has_value();
      const uint64_t total = stamped ? *in.host_notifications_at_sample : *in.host_notifications_total;
      // Two ends of one window must be taken the same way (both on arrival
      // or both at a Step); on a change there is no delta this once.
      if (st.host_at_sample && st.host_at_sample_stamped == stamped)
        host_delta = total >= *st.host_at_sample ? total - *st.host_at_sample : total;
      st.host_at_sample = total;
      st.host_at_sample_stamped = stamped;
    } else {
      st.host_at_sample.reset();
    }
    const double secs = s.interval_ns / 1e9;
    v.has_sample = true;
    v.requests_per_s = secs > 0 ? s.requests / secs : 0;
    if (!in.host_notifications_total && secs > 0) v.notifications_per_s = s.kicks / secs;
    const uint64_t notif = host_delta.value_or(s.kicks);
    v.notifications_per_request = s.requests ? static_cast<double>(notif) / s.requests : 0;
    v.mean_depth = s.mean_depth_milli / 1000.0;
    if (s.lease == proto::LeaseState::kExpired && v.guest_lease != proto::LeaseState::kExpired)
      ++v.lease_expiries;
    v.guest_lease = s.lease;
    v.applied_mode = s.applied_mode;
    v.applied_batch = s.applied_batch;
    v.applied_defer_ns = s.applied_defer_ns;
    AddToTotals(v, s);
  }
  if (in.agent_connected) {
    st.renewed_ns = now_ns;  // this Step's policy renews its lease
  } else if (!in.sample) {
    AgentGone(st, in.host_notifications_total.has_value(), now_ns);
  }

  // (mode, B, T) to be in force.
  proto::KickMode mode = spec.mode;
  uint32_t b = 1;
  uint64_t t = 0;
  std::string action;
  // Observed only: the kernel's driver kicks on its own; nothing to compute.
  switch (in.observe_only ? proto::KickMode::kImmediate : spec.mode) {
    case proto::KickMode::kImmediate:
    case proto::KickMode::kEventIdx:
      st.law.reset();
      break;
    case proto::KickMode::kStatic:
      st.law.reset();
      b = spec.batch;
      t = spec.defer_ns;
      break;
    case proto::KickMode::kAdaptive:
      if (spec_changed || !st.law || new_connection) {
        // A fresh law from the spec's starting point (restarts cleanly
        // from any (B, T): see docs/control.md).
        st.law = std::make_unique<AdaptiveLaw>(config_.law);
        b = spec.batch;
        t = spec.defer_ns;
        mode = config_.law.event_idx ? proto::KickMode::kEventIdx : proto::KickMode::kAdaptive;
      } else {
        b = v.b;
        t = v.t_ns;
        mode = v.mode;
      }
      if (in.sample) {
        LawInput li = LawInputFromSample(*in.sample, host_delta);
        // The guest's applied values are believed only for the mode we sent.
        if (!Batching(in.sample->applied_mode) && Batching(v.spec.mode)) li.b = 1, li.t_ns = 0;
        LawOutput o = st.law->Step(li);
        b = o.b;
        t = o.t_ns;
        mode = o.event_idx ? proto::KickMode::kEventIdx : proto::KickMode::kAdaptive;
        action = std::string(LawActionName(o.action));
      } else {
        action = v.last_action;
      }
      break;
  }
  if (b <= 1) {
    b = 1;
    if (spec.mode != proto::KickMode::kStatic) t = 0;
  }
  const bool changed = !st.initialised || mode_changed || mode != v.mode || b != v.b || t != v.t_ns;
  if (st.initialised && mode_changed) ++v.policy_switches;
  v.spec = spec;
  v.mode = mode;
  v.source = source;
  v.b = b;
  v.t_ns = t;
  v.last_action = action;
  if (changed) v.generation = next_generation_++;
  st.initialised = true;
}

void ControlLoop::AgentGone(State& st, bool host_counted, int64_t now_ns) const {
  QueueView& v = st.view;
  // No agent reports on the queue: its last rates are not current.
  v.requests_per_s = 0;
  v.notifications_per_request = 0;
  v.mean_depth = 0;
  if (!host_counted) v.notifications_per_s = 0;  // they were the guest's kicks
  // Nor is its lease renewed: the lease last sent runs out lease_ns after
  // that, and the driver falls back to its default (docs/protocol.md). Shown
  // and counted as if reported, so VkickLeaseExpired fires for it too.
  if (v.guest_lease != proto::LeaseState::kActive || !st.renewed_ns ||
      now_ns - *st.renewed_ns < static_cast<int64_t>(config_.lease_ns))
    return;
  v.guest_lease = proto::LeaseState::kExpired;
  ++v.lease_expiries;
  v.applied_mode = proto::KickMode::kImmediate;
  v.applied_batch = 1;
  v.applied_defer_ns = 0;
}

void ControlLoop::HoldFrozen(State& st, int64_t now_ns) const {
  QueueView& v = st.view;
  v.requests_per_s = 0;
  v.notifications_per_s = 0;
  v.notifications_per_request = 0;
  v.mean_depth = 0;
  // The lease last sent is as good as it was: the guest has not run since.
  if (st.renewed_ns) st.renewed_ns = now_ns;
  st.last_step_ns = now_ns;
}

std::vector<QueueView> ControlLoop::View() const {
  std::vector<QueueView> out;
  out.reserve(queues_.size());
  for (const auto& [k, st] : queues_) out.push_back(st.view);
  return out;
}

}  // namespace vkick
