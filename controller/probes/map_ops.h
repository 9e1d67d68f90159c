// BPF maps as the probes' control plane sees them (the katran pattern):
// HostProbes adapts the real map fds to these, unit tests give the control
// plane fakes with the same capacity behaviour, so the user-side logic (who
// owns which key and slot, what fits) is tested without root or a kernel.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace vkick {

template <typename Key, typename Value>
class MapOps {
 public:
  virtual ~MapOps() = default;
  // Insert or replace (BPF_ANY). kResourceExhausted when a new key does not
  // fit (the kernel's E2BIG on a full map).
  virtual absl::Status Update(const Key& key, const Value& value) = 0;
  // kNotFound when the key is absent.
  virtual absl::Status Delete(const Key& key) = 0;
};

// The per-CPU counter array the guest-write programs increment at a slot
// index (queue_counts), as the control plane that hands out the slots sees
// it. A slot is zeroed before any notify key points to it, and reused only
// after no key points to it and every program that could still have read
// such a key has finished (WaitForPrograms), so a reused slot starts at 0
// for its new owner and no late increment of the old owner lands in it.
class CounterSlotOps {
 public:
  virtual ~CounterSlotOps() = default;
  // Sets the slot to 0 on every CPU.
  virtual absl::Status Zero(uint32_t slot) = 0;
  // The slot's count, summed over the CPUs.
  virtual absl::StatusOr<uint64_t> Sum(uint32_t slot) = 0;
  // Returns when every program running at the call has finished (an RCU
  // grace period: the programs run under rcu_read_lock). Milliseconds.
  virtual absl::Status WaitForPrograms() = 0;
};

}  // namespace vkick
