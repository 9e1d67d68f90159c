// The control loop (docs/control.md, "The loop"): once per interval, per
// queue, the host-counted notifications (trusted, cumulative from the
// probes) and the agent's latest sample -> the queue's resolved PolicySpec
// -> (mode, B, T) to send with a lease and a generation that changes only
// when the policy does.
//
// Pure: time is an argument, no I/O, no threads. The daemon's LoopRunner
// gathers the inputs (probes, channel), calls Step(), and sends the outputs.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "controller/control/adaptive_law.h"
#include "controller/control/policy.h"
#include "protocol/messages.h"

namespace vkick {

// A queue as the host names it: label values from discovery or from the
// --vhost-user declarations, never from the guest.
struct QueueKey {
  std::string vm;
  std::string device;
  uint16_t queue = 0;
  auto operator<=>(const QueueKey&) const = default;
};

struct LoopConfig {
  uint64_t lease_ns = 5'000'000'000;  // sent with every policy, renewed each step
  LawConfig law;
};

struct QueueInput {
  QueueKey key;
  // Cumulative notifications the probes counted for the queue; nullopt when
  // no probe covers it (then the guest's own kick count is believed).
  std::optional<uint64_t> host_notifications_total;
  bool agent_connected = false;
  // The guest kernel's own driver runs the queue (hello driver = kernel):
  // samples are shown, no policy is computed or sent.
  bool observe_only = false;
  // Who drives the queue in the guest, as its agent announced it (shown by
  // vkickctl; vkick-blk until an agent says otherwise).
  proto::DriverKind driver = proto::DriverKind::kVkickBlk;
  // Which agent connection reports on the queue (0: none). A new one (the
  // agent re-announced: its driver set changed) restarts the adaptive law
  // from the spec's starting point: a B tuned for the previous driver
  // process says nothing about the next one, and B = 1 never adds latency.
  uint64_t agent_connection = 0;
  // The VM runs no vCPU or is being migrated (vm_lifecycle.h IsFrozen):
  // the queue is held as it is. No (mode, B, T) change, none sent (nobody
  // would read it), and its lease does not run out: the guest's clock stands
  // still too, so the lease counts again from the resume.
  bool frozen = false;
  // The VM's run state as vkickctl shows it ("running", "paused", ...;
  // RunStateName), passed through; "" for queues of no VM (--vhost-user).
  std::string vm_state;
  // A sample received since the last Step (consumed by this Step).
  std::optional<proto::QueueSample> sample;
  // The host total when that sample (its latest part) arrived. The guest's
  // window ends then, not at this Step: comparing the guest's kicks with the
  // host's count between two Steps mixes windows shifted by up to an
  // interval, and every change of B then looks like a lying guest.
  // nullopt: the Step-time total stands in (as before stamping existed).
  std::optional<uint64_t> host_notifications_at_sample;
};

// Where a queue's policy came from (the `source` label).
enum class PolicySource : uint8_t { kDefault, kVm, kDevice, kQueue };
const char* PolicySourceName(PolicySource s);  // "default", "vm", "device", "queue"

// A queue's state after a Step: the status row and the metric values.
struct QueueView {
  QueueKey key;
  PolicySpec spec;  // the resolved policy (mode and static/start values)
  PolicySource source = PolicySource::kDefault;
  // The mode sent: the spec's, except adaptive, which the law runs as
  // event-idx with (B, T) (or, event-idx off or distrusted, as adaptive: plain
  // kicks with (B, T)).
  proto::KickMode mode = proto::KickMode::kImmediate;
  uint32_t b = 1;
  uint64_t t_ns = 0;
  uint64_t generation = 0;        // of the (mode, B, T) now in force; 0: none yet
  uint64_t acked_generation = 0;  // the highest generation the agent acked
  bool agent_connected = false;
  bool observe_only = false;      // the guest kernel's driver: no policy
  bool frozen = false;            // QueueInput::frozen: held as it is
  std::string vm_state;           // QueueInput::vm_state
  proto::DriverKind driver = proto::DriverKind::kVkickBlk;  // QueueInput::driver
  bool has_sample = false;        // the fields below come from a sample
  proto::LeaseState guest_lease = proto::LeaseState::kNone;
  proto::KickMode applied_mode = proto::KickMode::kImmediate;
  uint16_t applied_batch = 1;
  uint32_t applied_defer_ns = 0;
  std::string last_action;        // the adaptive law's last action ("" otherwise)
  // Rates over the last sample's interval (host rate over the last Step).
  double notifications_per_s = 0;
  double requests_per_s = 0;
  double notifications_per_request = 0;
  double mean_depth = 0;
  // Cumulative guest data (summed samples) for the histograms and counters.
  uint64_t requests_total = 0;
  uint64_t guest_kicks_total = 0;
  uint64_t timer_kicks_total = 0;  // of those, fired by the deferral bound T
  uint64_t completed_total = 0;
  std::array<uint64_t, proto::kDepthBuckets> depth_hist{};
  std::array<uint64_t, proto::kLatencyBuckets> latency_hist{};
  double depth_sum = 0;          // exact: mean depth x requests per sample
  double latency_sum_s = 0;      // estimated from bucket midpoints (no sum on the wire)
  uint64_t policy_switches = 0;  // changes of mode
  uint64_t lease_expiries = 0;   // samples that newly reported lease = expired
};

// What to send to one queue's agent.
struct PolicyOut {
  QueueKey key;
  proto::KickMode mode = proto::KickMode::kImmediate;
  uint16_t batch = 1;
  uint32_t defer_ns = 0;
  uint64_t lease_ns = 0;
  uint64_t generation = 0;
};

class ControlLoop {
 public:
  // Generations start above `generation_base` (vkickd uses the wall clock in
  // microseconds at start, so they keep increasing across restarts).
  ControlLoop(LoopConfig config, uint64_t generation_base);

  // One interval. Queues absent from `inputs` are forgotten (their VM is
  // gone: their series go too). Returns a policy for every queue with a
  // connected agent (renewing its lease), except observe-only ones, in key order.
  std::vector<PolicyOut> Step(const PolicyTable& table, const std::vector<QueueInput>& inputs,
                              int64_t now_ns);

  // The queue's agent acknowledged a policy message whose highest generation
  // is `generation` (see the .cc for why that covers every queue at or below).
  void OnAck(const QueueKey& key, uint64_t generation);

  std::vector<QueueView> View() const;
  const LoopConfig& config() const { return config_; }

 private:
  struct State {
    QueueView view;
    std::unique_ptr<AdaptiveLaw> law;  // while adaptive
    std::optional<uint64_t> host_prev;         // host total at the last Step
    std::optional<uint64_t> host_at_sample;    // host total at the last sample
    bool host_at_sample_stamped = false;       // ... taken on its arrival
    uint64_t agent_connection = 0;             // the last one seen (0: none yet)
    std::optional<int64_t> renewed_ns;         // the last Step with an agent (lease renewed)
    std::optional<int64_t> last_step_ns;
    bool initialised = false;
  };
  void StepQueue(State& st, const PolicyTable& table, const QueueInput& in, int64_t now_ns);
  void AgentGone(State& st, bool host_counted, int64_t now_ns) const;
  // A frozen queue's Step: its policy and lease held, its rates zero.
  void HoldFrozen(State& st, int64_t now_ns) const;

  LoopConfig config_;
  uint64_t next_generation_;
  std::map<QueueKey, State> queues_;
};

// The resolved spec and which entry it came from.
std::pair<PolicySpec, PolicySource> ResolveWithSource(const PolicyTable& table,
                                                      const QueueKey& key);

// Histogram bucket upper bounds in base units, matching the protocol's
// buckets (the last one, +Inf, is implicit).
const std::vector<double>& DepthBucketBounds();          // requests
const std::vector<double>& LatencyBucketBoundsSeconds();  // seconds

}  // namespace vkick
