// The user side of the `notify` map ({vm, space, addr} -> {device, queue}):
// vkickd is its only writer, so the set of keys each VM owns is kept here
// and SetNotifyTargets costs one syscall per key that changed, never a walk
// of the whole map (at 4096 VMs x 8 queues a walk is 32768 syscalls per VM,
// under the lock every VM and the scrape share).
//
// A VM's targets are installed all or nothing: a VM whose targets do not fit
// beside the others' has none installed (its writes count as unmatched) and
// Set says kResourceExhausted, so a VM is either counted on every queue or
// visibly left out, never half counted.
//
// Not thread-safe (HostProbes' callers serialise).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "bpf/host_probes.h"
#include "controller/probes/map_ops.h"
#include "controller/probes/probe_backend.h"

namespace vkick {

class NotifyTargetTable {
 public:
  using Map = MapOps<vkick_notify_key, vkick_notify_target>;

  // `capacity`: the map's max_entries. `map` must outlive the table.
  NotifyTargetTable(Map* map, size_t capacity) : map_(map), capacity_(capacity) {}

  // Replaces the VM's targets (see above). kInvalidArgument for an unknown
  // address space (nothing changed).
  absl::Status Set(uint32_t vm_id, absl::Span<const NotifyTarget> targets);
  // Removes every target of the VM.
  absl::Status Drop(uint32_t vm_id);

  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  size_t owned(uint32_t vm_id) const;

 private:
  using Addr = std::pair<uint8_t, uint64_t>;  // space, address
  using Targets = std::map<Addr, vkick_notify_target>;

  static absl::Status Wanted(absl::Span<const NotifyTarget> targets, Targets* out);
  absl::Status Install(uint32_t vm_id, const Targets& old, const Targets& wanted);

  Map* const map_;
  const size_t capacity_;
  std::map<uint32_t, Targets> owned_;  // vm_id -> its keys, as installed
  size_t size_ = 0;                    // keys installed, all VMs
};

}  // namespace vkick
