#include "agent/policy_state.h"

#include <algorithm>
#include <limits>
#include <set>

namespace vkick::agent {

PolicyState::ApplyResult PolicyState::Apply(const proto::Policy& policy, const std::vector<AnnouncedDriver>& hello,
                                            uint64_t now_ns) {
  ApplyResult r;
  std::set<int32_t> changed;
  for (const proto::QueuePolicy& qp : policy.queues) {
    if (qp.ref.device_index >= hello.size() || qp.ref.queue_index >= hello[qp.ref.device_index].queues) {
      ++r.unknown_queues;
      continue;
    }
    const AnnouncedDriver& who = hello[qp.ref.device_index];
    if (proto::IsObserveOnly(who.driver)) {  // stock virtio_blk: nothing to steer it with
      ++r.observe_only_queues;
      continue;
    }
    if (!who.disk() && qp.ref.queue_index >= kControlBlockMaxQueues) {
      ++r.unsupported_queues;
      continue;
    }
    Applied a;
    a.mode = qp.mode;
    a.batch = qp.batch;
    a.defer_ns = qp.defer_ns;
    a.generation = qp.generation;
    a.expiry_ns = qp.lease_ns > std::numeric_limits<uint64_t>::max() - now_ns ? std::numeric_limits<uint64_t>::max()
                                                                              : now_ns + qp.lease_ns;
    applied_[{who.target(), qp.ref.queue_index}] = a;
    if (!who.disk()) changed.insert(who.pid);
    r.ack_generation = std::max(r.ack_generation, qp.generation);
  }
  r.changed_pids.assign(changed.begin(), changed.end());
  return r;
}

AppliedState PolicyState::StateOf(SteerTarget target, uint16_t queue, uint64_t now_ns) const {
  AppliedState s;
  auto it = applied_.find({target, queue});
  if (it == applied_.end()) return s;
  const Applied& a = it->second;
  s.generation = a.generation;
  if (now_ns < a.expiry_ns) {
    s.lease = proto::LeaseState::kActive;
    s.mode = a.mode;
    s.batch = a.batch;
    s.defer_ns = a.defer_ns;
  } else {
    s.lease = proto::LeaseState::kExpired;  // the driver fell back to immediate
  }
  return s;
}

std::vector<ControlEntry> PolicyState::EntriesFor(int32_t pid, uint16_t queues) const {
  const uint16_t n = std::clamp<uint16_t>(queues, 1, kControlBlockMaxQueues);
  std::vector<ControlEntry> out(n);
  for (uint16_t q = 0; q < n; ++q) {
    ControlEntry& e = out[q];
    e = ControlEntry{};
    e.mode = static_cast<uint8_t>(ControlMode::kImmediate);
    e.batch = 1;
    auto it = applied_.find({SteerTarget{pid, 0}, q});
    if (it == applied_.end()) continue;
    e.mode = static_cast<uint8_t>(it->second.mode);
    e.batch = it->second.batch;
    e.defer_ns = it->second.defer_ns;
    e.lease_expiry_ns = it->second.expiry_ns;
  }
  return out;
}

void PolicyState::Forget(SteerTarget target) {
  for (auto it = applied_.begin(); it != applied_.end();) {
    it = it->first.first == target ? applied_.erase(it) : std::next(it);
  }
}

uint64_t PolicyState::LatestExpiry() const {
  uint64_t m = 0;
  for (const auto& [k, a] : applied_) m = std::max(m, a.expiry_ns);
  return m;
}

}  // namespace vkick::agent
