#include "exporters/vkick_collector.h"

#include <array>
#include <limits>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "exporters/metrics_table.h"

namespace vkick {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Family(Metric id) {
  const MetricSpec& s = Spec(id);
  MetricFamily f;
  f.name = s.name;
  f.help = s.help;
  f.type = s.type;
  return f;
}

// Adds a series; `values` are in the table's label order.
void Add(MetricFamily& f, Metric id, const std::vector<std::string>& values, double v) {
  const MetricSpec& s = Spec(id);
  ClientMetric m;
  for (size_t i = 0; i < s.labels.size() && i < values.size(); ++i) {
    m.label.push_back({s.labels[i], values[i]});
  }
  switch (s.type) {
    case MetricType::Counter:
      m.counter.value = v;
      break;
    case MetricType::Gauge:
      m.gauge.value = v;
      break;
    default:
      m.untyped.value = v;
      break;
  }
  f.metric.push_back(std::move(m));
}

// Per attached VM: where its counters go.
struct VmSlot {
  const AttachedVm* vm;
  std::string name;  // the `vm` label value
  // device_id -> index into vm->info.devices
  std::unordered_map<uint16_t, size_t> device_index;
  // [device][queue] then the per-device "unknown queue" bucket.
  std::vector<std::vector<uint64_t>> queue_counts;
  std::vector<uint64_t> unknown_queue;
  uint64_t unknown_device = 0;
  uint64_t unmatched[2] = {0, 0};  // mmio, pio
  uint64_t interrupts = 0;
  std::set<std::pair<uint64_t, uint32_t>> vectors;
  // (vcpu index or kUnknownVcpu, reason label) -> count
  std::map<std::pair<uint64_t, std::string>, uint64_t> exits;
};

constexpr uint64_t kUnknownVcpu = ~0ull;

std::vector<std::string> QLabels(const QueueView& v) {
  return {v.key.vm, v.key.device, absl::StrCat(v.key.queue)};
}

// A histogram series from per-bucket (non-cumulative) counts; `bounds` are
// the finite upper bounds, the last count is the +Inf bucket.
template <size_t N>
void AddHistogram(MetricFamily& f, Metric id, const std::vector<std::string>& values,
                  const std::array<uint64_t, N>& counts, const std::vector<double>& bounds,
                  double sum) {
  const MetricSpec& s = Spec(id);
  ClientMetric m;
  for (size_t i = 0; i < s.labels.size() && i < values.size(); ++i)
    m.label.push_back({s.labels[i], values[i]});
  uint64_t cum = 0;
  for (size_t i = 0; i < N; ++i) {
    cum += counts[i];
    ClientMetric::Bucket b;
    b.cumulative_count = cum;
    b.upper_bound = i < bounds.size() ? bounds[i] : std::numeric_limits<double>::infinity();
    m.histogram.bucket.push_back(b);
  }
  m.histogram.sample_count = cum;
  m.histogram.sample_sum = sum;
  f.metric.push_back(std::move(m));
}

void AddLoopSeries(MetricFamily& f, Metric id, const LoopSnapshot& l) {
  switch (id) {
    case Metric::kControlLoopDuration:
      f.metric.push_back(l.loop_duration);
      break;
    case Metric::kQueuePolicyInfo:
      for (const QueueView& v : l.queues) {
        auto lv = QLabels(v);
        // Observe-only (the guest kernel's driver): no policy is in force.
        lv.push_back(v.observe_only ? "observe" : std::string(proto::KickModeName(v.spec.mode)));
        lv.push_back(v.observe_only ? "none" : PolicySourceName(v.source));
        Add(f, id, lv, 1);
      }
      break;
    case Metric::kQueueBatchThreshold:
      for (const QueueView& v : l.queues)
        if (!v.observe_only) Add(f, id, QLabels(v), v.b);
      break;
    case Metric::kQueueDeferBound:
      for (const QueueView& v : l.queues)
        if (!v.observe_only) Add(f, id, QLabels(v), v.t_ns / 1e9);
      break;
    case Metric::kQueuePolicyAcked:
      for (const QueueView& v : l.queues)
        if (!v.observe_only)
          Add(f, id, QLabels(v), v.generation != 0 && v.acked_generation == v.generation);
      break;
    case Metric::kQueueLeaseState:
      for (const QueueView& v : l.queues) {
        for (uint8_t i = 0; i <= proto::kMaxLeaseState; ++i) {
          const auto st = static_cast<proto::LeaseState>(i);
          auto lv = QLabels(v);
          lv.emplace_back(proto::LeaseStateName(st));
          Add(f, id, lv, v.guest_lease == st ? 1 : 0);
        }
      }
      break;
    case Metric::kQueueLeaseExpired:
      for (const QueueView& v : l.queues) Add(f, id, QLabels(v), v.lease_expiries);
      break;
    case Metric::kPolicySwitches:
      for (const QueueView& v : l.queues) Add(f, id, QLabels(v), v.policy_switches);
      break;
    case Metric::kAgentConnected:
      for (const auto& a : l.agents) Add(f, id, {a.vm}, a.connected);
      break;
    case Metric::kAgentMessagesRejected:
      for (const auto& a : l.agents) {
        for (size_t r = 1; r < proto::kRejectionCount; ++r) {
          Add(f, id, {a.vm, std::string(proto::RejectionName(static_cast<proto::Rejection>(r)))},
              a.rejected[r]);
        }
      }
      break;
    case Metric::kAgentConnectionsDropped:
      for (const auto& a : l.agents) Add(f, id, {a.vm}, a.dropped);
      break;
    case Metric::kAgentConnectionsRefused:
      for (size_t r = 0; r < kAgentRefusalCount; ++r)
        Add(f, id, {std::string(AgentRefusalName(static_cast<AgentRefusal>(r)))},
            l.agent_refused[r]);
      break;
    case Metric::kAdminRequestsRefused:
      for (size_t r = 0; r < l.admin_refused.size(); ++r)
        Add(f, id, {kAdminRefusalNames[r]}, l.admin_refused[r]);
      break;
    case Metric::kPolicySaveErrors:
      Add(f, id, {}, l.state_save_errors);
      break;
    case Metric::kPolicyStateLoadErrors:
      Add(f, id, {}, l.state_load_errors);
      break;
    case Metric::kVirtqueueDepth:
      for (const QueueView& v : l.queues) {
        if (v.has_sample)
          AddHistogram(f, id, QLabels(v), v.depth_hist, DepthBucketBounds(), v.depth_sum);
      }
      break;
    case Metric::kVirtqueueRequestLatency:
      for (const QueueView& v : l.queues) {
        if (v.has_sample)
          AddHistogram(f, id, QLabels(v), v.latency_hist, LatencyBucketBoundsSeconds(),
                       v.latency_sum_s);
      }
      break;
    case Metric::kVirtqueueRequests:
      for (const QueueView& v : l.queues)
        if (v.has_sample) Add(f, id, QLabels(v), v.requests_total);
      break;
    case Metric::kVirtqueueGuestKicks:
      for (const QueueView& v : l.queues)
        if (v.has_sample) Add(f, id, QLabels(v), v.guest_kicks_total);
      break;
    case Metric::kVirtqueueGuestTimerKicks:
      for (const QueueView& v : l.queues)
        if (v.has_sample) Add(f, id, QLabels(v), v.timer_kicks_total);
      break;
    default:
      break;
  }
}

}  // namespace

std::vector<MetricFamily> BuildMetricFamilies(const DaemonSnapshot& snap,
                                              const ExitReasonNamer& namer,
                                              const std::string& version,
                                              const LoopSnapshot* loop) {
  const CounterSnapshot* c = snap.counters ? &*snap.counters : nullptr;

  std::vector<VmSlot> slots;
  std::unordered_map<uint32_t, size_t> by_vm_id;
  std::set<std::string> names;
  slots.reserve(snap.vms.size());
  for (const AttachedVm& vm : snap.vms) {
    VmSlot s;
    s.vm = &vm;
    // Two VMs with one -name would collide into the same series (an invalid
    // exposition): the later one is told apart by its pid.
    s.name = vm.info.name;
    if (!names.insert(s.name).second) {
      s.name = absl::StrCat(vm.info.name, "/pid", vm.info.pid);
      names.insert(s.name);
    }
    for (size_t i = 0; i < vm.info.devices.size(); ++i) {
      // First wins should discovery ever repeat an id.
      s.device_index.emplace(vm.info.devices[i].device_id, i);
      s.queue_counts.emplace_back(vm.info.devices[i].num_queues, 0);
    }
    s.unknown_queue.assign(vm.info.devices.size(), 0);
    by_vm_id.emplace(vm.vm_id, slots.size());
    slots.push_back(std::move(s));
  }
  auto slot_of = [&](uint32_t vm_id) -> VmSlot* {
    auto it = by_vm_id.find(vm_id);
    return it == by_vm_id.end() ? nullptr : &slots[it->second];
  };

  if (c != nullptr) {
    for (const NotificationCount& n : c->notifications) {
      VmSlot* s = slot_of(n.vm_id);
      if (s == nullptr) continue;  // VM no longer attached: its series are gone
      auto it = s->device_index.find(n.device_id);
      if (it == s->device_index.end()) {
        s->unknown_device += n.count;
      } else if (n.queue < s->queue_counts[it->second].size()) {
        s->queue_counts[it->second][n.queue] += n.count;
      } else {
        s->unknown_queue[it->second] += n.count;
      }
    }
    for (const UnmatchedCount& u : c->unmatched_writes) {
      VmSlot* s = slot_of(u.vm_id);
      if (s == nullptr) continue;
      s->unmatched[u.space == NotifyTarget::Space::kPio ? 1 : 0] += u.count;
    }
    for (const InterruptCount& i : c->interrupts) {
      VmSlot* s = slot_of(i.vm_id);
      if (s == nullptr) continue;
      s->interrupts += i.count;
      s->vectors.emplace(i.msi_address, i.msi_data);
    }
    for (const ExitCount& e : c->exits) {
      VmSlot* s = slot_of(e.vm_id);
      if (s == nullptr) continue;
      uint64_t vcpu = e.vcpu < s->vm->info.vcpu_tids.size() ? e.vcpu : kUnknownVcpu;
      s->exits[{vcpu, namer(e.isa, e.reason)}] += e.count;
    }
  }

  std::vector<MetricFamily> out;
  for (const MetricSpec& spec : MetricTable()) {
    MetricFamily f = Family(spec.id);
    switch (spec.id) {
      case Metric::kBuildInfo:
        Add(f, spec.id, {version}, 1);
        break;
      case Metric::kProbesAttached:
        Add(f, spec.id, {}, c != nullptr ? 1 : 0);
        break;
      case Metric::kProbeKickFdBindings:
        Add(f, spec.id, {}, c != nullptr ? c->kick_fds.size() : 0);
        break;
      case Metric::kProbeErrors: {
        ProbeErrors pe = c != nullptr ? c->errors : ProbeErrors{};
        Add(f, spec.id, {"map_full"}, pe.map_full);
        Add(f, spec.id, {"read_user_failed"}, pe.read_user_failed);
        Add(f, spec.id, {"bad_vhost_msg"}, pe.bad_vhost_msg);
        Add(f, spec.id, {"bad_queue"}, pe.bad_queue);
        Add(f, spec.id, {"control"}, snap.probe_errors.control);
        Add(f, spec.id, {"read_counters"}, snap.probe_errors.read_counters);
        break;
      }
      case Metric::kProbeMapFull:
        for (int m = 0; m < kNumProbeMaps; ++m) {
          Add(f, spec.id, {ProbeMapName(static_cast<ProbeMap>(m))}, snap.map_full[m]);
        }
        break;
      case Metric::kProbeKickSyscallsAttached:
        Add(f, spec.id, {}, snap.kick_syscalls_attached ? 1 : 0);
        break;
      case Metric::kQmpConnected:
        for (const auto& q : snap.qmp) Add(f, spec.id, {q.qmp_path}, q.connected ? 1 : 0);
        break;
      case Metric::kQmpErrors:
        for (const auto& q : snap.qmp) {
          for (int r = 0; r < kNumQmpErrorReasons; ++r) {
            Add(f, spec.id, {q.qmp_path, QmpErrorReasonName(static_cast<QmpErrorReason>(r))},
                q.errors[r]);
          }
        }
        break;
      case Metric::kDiscoveryDuration:
        f.metric.push_back(snap.discovery_duration);
        break;
      case Metric::kVmInfo:
        for (const VmSlot& s : slots) {
          Add(f, spec.id, {s.name, absl::StrCat(s.vm->info.pid)}, 1);
        }
        break;
      case Metric::kVmProbed:
        for (const VmSlot& s : slots) Add(f, spec.id, {s.name}, s.vm->probed ? 1 : 0);
        break;
      case Metric::kVmRunning:
        for (const VmSlot& s : slots) {
          Add(f, spec.id, {s.name}, !s.vm->departed && !IsFrozen(s.vm->info.run_state) ? 1 : 0);
        }
        break;
      case Metric::kVirtqueueNotifications:
        for (const VmSlot& s : slots) {
          const auto& devs = s.vm->info.devices;
          for (size_t d = 0; d < devs.size(); ++d) {
            for (size_t q = 0; q < s.queue_counts[d].size(); ++q) {
              Add(f, spec.id, {s.name, devs[d].label, absl::StrCat(q)},
                  s.queue_counts[d][q]);
            }
            // Bounded: at most one extra series per discovered device.
            if (s.unknown_queue[d] != 0) {
              Add(f, spec.id, {s.name, devs[d].label, kUnknownLabel},
                  s.unknown_queue[d]);
            }
          }
          if (s.unknown_device != 0) {
            Add(f, spec.id, {s.name, kUnknownLabel, kUnknownLabel}, s.unknown_device);
          }
        }
        break;
      case Metric::kVmUnmatchedIoWrites:
        for (const VmSlot& s : slots) {
          Add(f, spec.id, {s.name, "mmio"}, s.unmatched[0]);
          Add(f, spec.id, {s.name, "pio"}, s.unmatched[1]);
        }
        break;
      case Metric::kVmExits:
        for (const VmSlot& s : slots) {
          for (const auto& [key, count] : s.exits) {
            std::string vcpu = key.first == kUnknownVcpu ? kUnknownLabel : absl::StrCat(key.first);
            Add(f, spec.id, {s.name, vcpu, key.second}, count);
          }
        }
        break;
      case Metric::kVmInterrupts:
        for (const VmSlot& s : slots) Add(f, spec.id, {s.name}, s.interrupts);
        break;
      case Metric::kVmInterruptVectors:
        for (const VmSlot& s : slots) Add(f, spec.id, {s.name}, s.vectors.size());
        break;
      default:
        if (loop != nullptr) AddLoopSeries(f, spec.id, *loop);
        break;
    }
    out.push_back(std::move(f));
  }
  return out;
}

std::vector<MetricFamily> VkickCollector::Collect() const {
  // Renders the control loop's latest reading: a scrape reads no map and
  // changes nothing.
  std::shared_ptr<const DaemonSnapshot> snap = latest_();
  if (loop_) {
    LoopSnapshot l = loop_();
    return BuildMetricFamilies(*snap, namer_, version_, &l);
  }
  return BuildMetricFamilies(*snap, namer_, version_);
}

}  // namespace vkick
