#include "controller/channel/agent_session.h"

#include <algorithm>
#include <utility>

namespace vkick {

void MergeSample(proto::QueueSample& acc, const proto::QueueSample& next) {
  const uint64_t req = acc.requests + next.requests;
  acc.mean_depth_milli =
      req == 0 ? 0
               : static_cast<uint32_t>((uint64_t{acc.mean_depth_milli} * acc.requests +
                                        uint64_t{next.mean_depth_milli} * next.requests) / req);
  acc.interval_ns += next.interval_ns;
  acc.requests = req;
  acc.kicks += next.kicks;
  acc.timer_kicks += next.timer_kicks;
  acc.completed += next.completed;
  for (size_t i = 0; i < acc.depth_hist.size(); ++i) acc.depth_hist[i] += next.depth_hist[i];
  for (size_t i = 0; i < acc.latency_hist.size(); ++i) acc.latency_hist[i] += next.latency_hist[i];
  acc.max_depth = std::max(acc.max_depth, next.max_depth);
  acc.lease = next.lease;
  acc.applied_mode = next.applied_mode;
  acc.applied_batch = next.applied_batch;
  acc.applied_defer_ns = next.applied_defer_ns;
  acc.applied_generation = next.applied_generation;
}
namespace {

std::vector<proto::KnownDevice> KnownOf(std::vector<ChannelDevice>& devices) {
  std::vector<proto::KnownDevice> out;
  for (size_t i = 0; i < devices.size(); ++i) {
    devices[i].known.device_id = static_cast<uint16_t>(i);  // index into devices_
    out.push_back(devices[i].known);
  }
  return out;
}

}  // namespace

AgentSession::AgentSession(proto::GuardConfig config, std::vector<ChannelDevice> devices,
                           int64_t now_ns, DeviceClaim claim)
    : devices_(std::move(devices)),
      guard_(config, KnownOf(devices_), now_ns),
      claim_(std::move(claim)) {}

bool AgentSession::Feed(std::span<const uint8_t> bytes, int64_t now_ns) {
  if (drop_) return false;
  decoder_.Feed(bytes, [&](proto::DecodeResult&& r) { OnFrame(std::move(r), now_ns); });
  return !drop_;
}

void AgentSession::Finish(int64_t now_ns) {
  if (drop_) return;
  decoder_.Finish([&](proto::DecodeResult&& r) { OnFrame(std::move(r), now_ns); });
}

void AgentSession::OnFrame(proto::DecodeResult&& r, int64_t now_ns) {
  if (drop_) return;
  proto::ConnectionGuard::Verdict v = guard_.Admit(r, now_ns);
  if (v == proto::ConnectionGuard::Verdict::kDrop) {
    drop_ = true;
    return;
  }
  if (v != proto::ConnectionGuard::Verdict::kAccept || !r.message) return;
  if (auto* h = std::get_if<proto::Hello>(&*r.message)) {
    OnHello(*h);
  } else if (auto* s = std::get_if<proto::Sample>(&*r.message)) {
    OnSample(*s);
  } else if (auto* a = std::get_if<proto::Ack>(&*r.message)) {
    if (acks_.size() < 64) acks_.push_back(a->generation);
  } else if (std::holds_alternative<proto::Bye>(*r.message)) {
    // The announcement ended (the guard dropped its mapping): the queues it
    // named are no longer reported on. A unix-socket agent closes next; a
    // virtio-serial one re-announces on the same stream. Samples already
    // taken in stay (host keys, valid when they came).
    refs_.clear();
    drivers_.clear();
  }
  // error: nothing to do.
}

void AgentSession::OnHello(const proto::Hello& h) {
  agent_id_ = h.agent_id;
  for (size_t d = 0; d < h.devices.size(); ++d) {
    const uint16_t di = static_cast<uint16_t>(d);
    auto hq = guard_.Resolve({di, 0});
    if (!hq || hq->device_id >= devices_.size()) continue;  // matches nothing: ignored
    const ChannelDevice& dev = devices_[hq->device_id];
    // Another agent reporting on it would steer its driver: refused.
    if (claim_ && !claim_(dev)) {
      ++refused_[static_cast<size_t>(proto::Rejection::kDeviceOwned)];
      continue;
    }
    // Queues beyond the known count do not exist: never mapped, counted
    // (once per device) so an agent announcing phantoms shows.
    const proto::GuestDevice& g = h.devices[d];
    if (g.num_queues > dev.known.num_queues)
      ++refused_[static_cast<size_t>(proto::Rejection::kUnknownQueue)];
    for (uint16_t q = 0; q < std::min(g.num_queues, dev.known.num_queues); ++q) {
      const QueueKey key{dev.vm, dev.device, q};
      refs_[key] = {di, q};
      drivers_[key] = g.driver;
    }
  }
}

void AgentSession::OnSample(const proto::Sample& s) {
  for (const proto::QueueSample& qs : s.queues) {
    auto hq = guard_.Resolve(qs.ref);
    if (!hq || hq->device_id >= devices_.size()) {
      ++unmapped_samples_;
      continue;
    }
    const ChannelDevice& dev = devices_[hq->device_id];
    // Bounded: keys are host queues bound at hello (<= kMaxQueues).
    const QueueKey key{dev.vm, dev.device, hq->queue};
    if (!refs_.count(key)) {  // a device refused at hello (owned by another agent)
      ++unmapped_samples_;
      continue;
    }
    auto [it, fresh] = samples_.try_emplace(key, qs);
    if (!fresh) MergeSample(it->second, qs);
    // A merged sample's window ends at its latest part: re-stamp.
    unstamped_.insert(key);
    stamps_.erase(key);
  }
}

std::set<QueueKey> AgentSession::ObservedOnly() const {
  std::set<QueueKey> out;
  for (const auto& [k, driver] : drivers_)
    if (proto::IsObserveOnly(driver)) out.insert(k);
  return out;
}

std::vector<QueueKey> AgentSession::Queues() const {
  std::vector<QueueKey> out;
  for (const auto& [k, ref] : refs_) out.push_back(k);
  return out;
}

void AgentSession::StampHost(const std::map<QueueKey, uint64_t>& host_totals) {
  for (const QueueKey& k : unstamped_) {
    if (auto it = host_totals.find(k); it != host_totals.end()) stamps_[k] = it->second;
  }
  unstamped_.clear();
}

std::map<QueueKey, uint64_t> AgentSession::TakeHostStamps() { return std::exchange(taken_stamps_, {}); }

std::map<QueueKey, proto::QueueSample> AgentSession::TakeSamples() {
  // A sample taken before it was stamped has no stamp (the loop then uses
  // its own step-time total for it).
  unstamped_.clear();
  taken_stamps_ = std::exchange(stamps_, {});
  return std::exchange(samples_, {});
}

std::vector<uint64_t> AgentSession::TakeAcks() { return std::exchange(acks_, {}); }

std::array<uint64_t, proto::kRejectionCount> AgentSession::TakeRejections() {
  std::array<uint64_t, proto::kRejectionCount> out{};
  for (size_t i = 0; i < proto::kRejectionCount; ++i) {
    uint64_t now = guard_.rejections(static_cast<proto::Rejection>(i));
    out[i] = now - reported_[i] + refused_[i];
    reported_[i] = now;
  }
  refused_ = {};
  return out;
}

std::vector<uint8_t> AgentSession::EncodePolicies(const std::vector<PolicyOut>& policies) const {
  proto::Policy msg;
  for (const PolicyOut& p : policies) {
    auto it = refs_.find(p.key);
    if (it == refs_.end()) continue;
    auto dk = drivers_.find(p.key);
    if (dk != drivers_.end() && proto::IsObserveOnly(dk->second)) continue;  // stock virtio_blk: never a policy
    if (msg.queues.size() >= proto::kMaxQueues) break;
    proto::QueuePolicy q;
    q.ref = it->second;
    q.mode = p.mode;
    q.batch = p.batch;
    q.defer_ns = p.defer_ns;
    q.lease_ns = p.lease_ns;
    q.generation = p.generation;
    msg.queues.push_back(q);
  }
  if (msg.queues.empty()) return {};
  return proto::Encode(msg).bytes;  // empty if it would not validate
}

}  // namespace vkick
