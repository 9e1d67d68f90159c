// How many VMs, queues and vCPUs the host probes' maps hold, and the
// max_entries of every map that follows from it. Pure (no libbpf): vkickd's
// flags (--max-vms, --max-queues-per-vm, --max-vcpus-per-vm) are checked
// here before anything is loaded, and HostProbes sets the sizes before the
// load (a BPF map cannot grow afterwards).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "bpf/host_probes.h"

namespace vkick {

struct ProbeCapacity {
  uint32_t max_vms = VKICK_DEFAULT_MAX_VMS;
  uint32_t queues_per_vm = VKICK_DEFAULT_QUEUES_PER_VM;
  uint32_t vcpus_per_vm = VKICK_DEFAULT_VCPUS_PER_VM;
};

// max_entries of each map (the formulas of bpf/host_probes.h).
struct ProbeMapSizes {
  uint32_t tracked, notify, notify_counts, queue_counts, exit_counts, unmatched_counts,
      irq_counts, vhost_sock, kick_fds;
};

// Bounds: a VM count the maps can hold without wrapping u32 sizes or asking
// the kernel for absurd preallocations (kInvalidArgument says which).
absl::Status ValidateProbeCapacity(const ProbeCapacity& c);
ProbeMapSizes MapSizesFor(const ProbeCapacity& c);
// "4096 VMs x 8 queues x 8 vCPUs", for logs and errors.
std::string DescribeCapacity(const ProbeCapacity& c);

}  // namespace vkick
