#include "exporters/vkick_collector.h"

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

}  // namespace

std::vector<MetricFamily> BuildMetricFamilies(const DaemonSnapshot& snap,
                                              const ExitReasonNamer& namer,
                                              const std::string& version) {
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
        Add(f, spec.id, {"control"}, snap.probe_errors.control);
        Add(f, spec.id, {"read_counters"}, snap.probe_errors.read_counters);
        break;
      }
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
    }
    out.push_back(std::move(f));
  }
  return out;
}

std::vector<MetricFamily> VkickCollector::Collect() const {
  return BuildMetricFamilies(daemon_.Scrape(), namer_, version_);
}

}  // namespace vkick
