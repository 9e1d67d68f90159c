// One agent connection, without I/O: bytes in -> decoded, guarded messages;
// policies out -> one encoded frame. The guest is hostile: every frame goes
// through proto::ConnectionGuard (rate limit, order, declared queues, drop
// after repeated rejections), and only queues the guard maps onto devices
// the host declared (discovery or --vhost-user) are ever named, by the
// host's labels.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "controller/loop/control_loop.h"
#include "protocol/codec.h"
#include "protocol/guard.h"

namespace vkick {

// A device the host knows, with the labels its queues get.
struct ChannelDevice {
  proto::KnownDevice known;  // matched against the guest's hello
  std::string vm;            // label values
  std::string device;
};

// Two samples of one queue arrived before the loop took them (the agent's
// and the loop's intervals drift): `next` is added to `acc` rather than
// replacing it, so requests and kicks cover the same time as the host's
// notification count between two steps. Latest wins for the state fields
// (lease, applied policy); mean depth is weighted by requests.
void MergeSample(proto::QueueSample& acc, const proto::QueueSample& next);

// Asked at each hello, per device the guard bound: may this connection
// report on it? One owner per (vm, device): false when another agent owns it
// (AgentServer keeps the owners). Null: every device may be claimed.
using DeviceClaim = std::function<bool(const ChannelDevice&)>;

class AgentSession {
 public:
  AgentSession(proto::GuardConfig config, std::vector<ChannelDevice> devices, int64_t now_ns,
               DeviceClaim claim = nullptr);

  // Feeds received bytes. Returns false when the connection must be dropped
  // (fatal framing error, or the guard's verdict).
  bool Feed(std::span<const uint8_t> bytes, int64_t now_ns);
  // The peer closed: a partial frame counts as truncated.
  void Finish(int64_t now_ns);

  bool hello_seen() const { return guard_.hello_seen(); }
  // Hellos accepted on this stream (a bye ends one; the next hello remaps).
  uint64_t announcements() const { return guard_.announcements(); }
  bool dropped() const { return guard_.dropped(); }
  // Host queues this agent reports on (bound at hello).
  std::vector<QueueKey> Queues() const;
  // It reports on at least one host queue (its announcement named a device
  // the host serves, and it owns it).
  bool reports() const { return !refs_.empty(); }
  // Who drives each of those queues in the guest (the hello's `driver`).
  const std::map<QueueKey, proto::DriverKind>& Drivers() const { return drivers_; }
  // Of those, the queues of devices the guest kernel's own virtio_blk runs
  // (hello driver = kernel, proto::IsObserveOnly): observed only, never sent
  // a policy.
  std::set<QueueKey> ObservedOnly() const;
  // Latest sample per queue since the last call (consumed).
  std::map<QueueKey, proto::QueueSample> TakeSamples();

  // Queues whose samples arrived since the last StampHost: the caller reads
  // the host's notification totals right then and stamps them, so the loop
  // compares a guest window with the host's count over the same window
  // (ending when the sample arrived, not when the loop next steps).
  bool has_unstamped() const { return !unstamped_.empty(); }
  // The queues whose newest sample waits for its host stamp.
  const std::set<QueueKey>& unstamped() const { return unstamped_; }
  void StampHost(const std::map<QueueKey, uint64_t>& host_totals);
  // The host total stamped at the latest (merged) sample of each queue taken
  // by the last TakeSamples() (consumed with it: call right after).
  std::map<QueueKey, uint64_t> TakeHostStamps();
  // Acked generations since the last call (consumed).
  std::vector<uint64_t> TakeAcks();
  // Rejections by reason since the last call (consumed), for the per-vm counters.
  std::array<uint64_t, proto::kRejectionCount> TakeRejections();
  // Samples that passed the guard but named queues nothing maps to (ignored).
  uint64_t unmapped_samples() const { return unmapped_samples_; }
  const std::string& agent_id() const { return agent_id_; }

  // One policy frame for the policies whose queues this agent reports;
  // empty when none applies. Never produces what the agent would reject.
  std::vector<uint8_t> EncodePolicies(const std::vector<PolicyOut>& policies) const;

 private:
  void OnFrame(proto::DecodeResult&& r, int64_t now_ns);
  void OnHello(const proto::Hello& h);
  void OnSample(const proto::Sample& s);

  std::vector<ChannelDevice> devices_;  // index = KnownDevice::device_id
  proto::StreamDecoder decoder_;
  proto::ConnectionGuard guard_;
  DeviceClaim claim_;
  std::array<uint64_t, proto::kRejectionCount> reported_{};
  // Refusals the session decides (device_owned, a device's queues beyond
  // the known count), not the guard: since the last TakeRejections.
  std::array<uint64_t, proto::kRejectionCount> refused_{};
  bool drop_ = false;
  std::string agent_id_;
  std::map<QueueKey, proto::QueueRef> refs_;  // host queue -> guest ref
  std::map<QueueKey, proto::DriverKind> drivers_;  // same keys as refs_
  std::map<QueueKey, proto::QueueSample> samples_;
  std::set<QueueKey> unstamped_;                 // bounded like samples_
  std::map<QueueKey, uint64_t> stamps_;          // for the samples in samples_
  std::map<QueueKey, uint64_t> taken_stamps_;    // for the last TakeSamples()
  std::vector<uint64_t> acks_;
  uint64_t unmapped_samples_ = 0;
};

}  // namespace vkick
