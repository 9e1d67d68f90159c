// A BPF hash map as the probes' control plane sees it (the katran pattern):
// HostProbes adapts the real map fd to it, unit tests give the control plane
// a fake with the same capacity behaviour, so the user-side logic (who owns
// which key, what fits) is tested without root or a kernel.
#pragma once

#include "absl/status/status.h"

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

}  // namespace vkick
