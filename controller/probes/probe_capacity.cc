#include "controller/probes/probe_capacity.h"

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {

// Upper bounds. Queues: the legacy value bound (a queue index is a u16 and
// at most VKICK_MAX_QUEUE). vCPUs: KVM's own maximum. VMs: far above any
// host; the largest map (exit counts) stays below 2^27 entries.
constexpr uint32_t kMaxVms = 1 << 16;
constexpr uint32_t kMaxQueues = VKICK_MAX_QUEUE;
constexpr uint32_t kMaxVcpus = 4096;
constexpr uint64_t kMaxEntries = 1u << 27;

absl::Status InRange(const char* what, uint32_t v, uint32_t max) {
  if (v >= 1 && v <= max) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " must be 1..", max, ", not ", v));
}

}  // namespace

absl::Status ValidateProbeCapacity(const ProbeCapacity& c) {
  if (auto s = InRange("--max-vms", c.max_vms, kMaxVms); !s.ok()) return s;
  if (auto s = InRange("--max-queues-per-vm", c.queues_per_vm, kMaxQueues); !s.ok()) return s;
  if (auto s = InRange("--max-vcpus-per-vm", c.vcpus_per_vm, kMaxVcpus); !s.ok()) return s;
  // Computed in 64 bits here, so the u32 sizes below cannot have wrapped.
  const uint64_t exits = uint64_t{c.max_vms} * c.vcpus_per_vm * VKICK_EXIT_REASONS_PER_VCPU;
  const uint64_t irqs = uint64_t{c.max_vms} * (c.queues_per_vm + 2);
  if (exits > kMaxEntries || irqs > kMaxEntries) {
    return absl::InvalidArgumentError(absl::StrCat(
        "probe maps for ", DescribeCapacity(c), " would need ", exits > irqs ? exits : irqs,
        " entries in one map (at most ", kMaxEntries, "): lower --max-vms or the per-VM counts"));
  }
  return absl::OkStatus();
}

ProbeMapSizes MapSizesFor(const ProbeCapacity& c) {
  const uint32_t vms = c.max_vms, q = c.queues_per_vm, v = c.vcpus_per_vm;
  return ProbeMapSizes{
      .tracked = VKICK_SIZE_TRACKED(vms),
      .notify = VKICK_SIZE_NOTIFY(vms, q),
      .notify_counts = VKICK_SIZE_NOTIFY_COUNTS(vms, q),
      .queue_counts = VKICK_SIZE_QUEUE_SLOTS(vms, q),
      .exit_counts = VKICK_SIZE_EXIT_COUNTS(vms, v),
      .unmatched_counts = VKICK_SIZE_UNMATCHED(vms),
      .irq_counts = VKICK_SIZE_IRQ_COUNTS(vms, q),
      .vhost_sock = VKICK_SIZE_VHOST_SOCKS(vms, q),
      .kick_fds = VKICK_SIZE_KICK_FDS(vms, q),
  };
}

std::string DescribeCapacity(const ProbeCapacity& c) {
  return absl::StrCat(c.max_vms, " VMs x ", c.queues_per_vm, " queues x ", c.vcpus_per_vm,
                      " vCPUs");
}

}  // namespace vkick
