#include "guest-policy/core/control_block.h"

#include <algorithm>
#include <cstring>

namespace vkick {
namespace {
uint32_t LoadSeq(const ControlBlock* cb) {
  return __atomic_load_n(&cb->seq, __ATOMIC_ACQUIRE);
}
}  // namespace

const char* ControlReadErrorName(ControlReadError e) {
  switch (e) {
    case ControlReadError::kNone: return "ok";
    case ControlReadError::kAbsent: return "absent";
    case ControlReadError::kBadMagic: return "bad magic";
    case ControlReadError::kBadVersion: return "bad version";
    case ControlReadError::kBadSize: return "bad size";
    case ControlReadError::kBusy: return "writer busy";
    case ControlReadError::kBadEntry: return "bad entry";
  }
  return "?";
}

ControlReadResult ReadControlBlock(const ControlBlock* cb, uint16_t queue, uint32_t queue_size) {
  ControlReadResult r;
  if (cb == nullptr) {
    r.error = ControlReadError::kAbsent;
    return r;
  }
  for (int attempt = 0; attempt < 8; ++attempt) {
    const uint32_t s1 = LoadSeq(cb);
    if (s1 & 1) continue;
    // Copy with relaxed atomics (the writer may be mid-update: a plain read
    // would be a data race); validate only after the seq check succeeded.
    uint32_t magic = __atomic_load_n(&cb->magic, __ATOMIC_RELAXED);
    uint16_t version = __atomic_load_n(&cb->version, __ATOMIC_RELAXED);
    uint16_t size = __atomic_load_n(&cb->size, __ATOMIC_RELAXED);
    uint16_t num = __atomic_load_n(&cb->num_entries, __ATOMIC_RELAXED);
    const uint16_t idx_guess = (queue < num && queue < kControlBlockMaxQueues) ? queue : 0;
    const ControlEntry& src = cb->entries[idx_guess];
    ControlEntry e;
    e.mode = __atomic_load_n(&src.mode, __ATOMIC_RELAXED);
    e.batch = __atomic_load_n(&src.batch, __ATOMIC_RELAXED);
    e.defer_ns = __atomic_load_n(&src.defer_ns, __ATOMIC_RELAXED);
    e.lease_expiry_ns = __atomic_load_n(&src.lease_expiry_ns, __ATOMIC_RELAXED);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (LoadSeq(cb) != s1) continue;

    if (magic != kControlBlockMagic) { r.error = ControlReadError::kBadMagic; return r; }
    if (version != kControlBlockVersion) { r.error = ControlReadError::kBadVersion; return r; }
    if (size != sizeof(ControlBlock)) { r.error = ControlReadError::kBadSize; return r; }
    if (num == 0 || num > kControlBlockMaxQueues) { r.error = ControlReadError::kBadEntry; return r; }
    if (e.mode > static_cast<uint8_t>(ControlMode::kAdaptive)) { r.error = ControlReadError::kBadEntry; return r; }
    ControlSnapshot s;
    s.mode = static_cast<ControlMode>(e.mode);
    if (s.mode == ControlMode::kAdaptive) s.mode = ControlMode::kStatic;  // the agent's choice is a (B,T)
    // Clamp rather than reject: a B beyond the ring would never fill (only T
    // would ever fire), a T beyond 1 ms is the bound the design promises.
    s.batch = std::clamp<uint32_t>(e.batch, 1, std::max<uint32_t>(queue_size, 1));
    s.defer_ns = std::min<uint64_t>(e.defer_ns, kControlMaxDeferNs);
    if (s.mode == ControlMode::kImmediate || s.batch == 1) {
      s.batch = 1;
      s.defer_ns = 0;
    }
    s.lease_expiry_ns = e.lease_expiry_ns;
    r.snapshot = s;
    return r;
  }
  r.error = ControlReadError::kBusy;
  return r;
}

void InitControlBlock(ControlBlock* cb, uint64_t writer_pid) {
  std::memset(cb, 0, sizeof(*cb));
  cb->version = kControlBlockVersion;
  cb->size = sizeof(ControlBlock);
  cb->writer_pid = writer_pid;
  cb->num_entries = 1;
  __atomic_store_n(&cb->magic, kControlBlockMagic, __ATOMIC_RELEASE);
}

void WriteControlEntries(ControlBlock* cb, const ControlEntry* entries, uint16_t n) {
  n = std::min<uint16_t>(std::max<uint16_t>(n, 1), kControlBlockMaxQueues);
  const uint32_t s = __atomic_load_n(&cb->seq, __ATOMIC_RELAXED);
  __atomic_store_n(&cb->seq, s + 1, __ATOMIC_RELAXED);
  std::atomic_thread_fence(std::memory_order_release);  // seq odd before data
  for (uint16_t i = 0; i < n; ++i) {
    ControlEntry& d = cb->entries[i];
    __atomic_store_n(&d.mode, entries[i].mode, __ATOMIC_RELAXED);
    __atomic_store_n(&d.batch, entries[i].batch, __ATOMIC_RELAXED);
    __atomic_store_n(&d.defer_ns, entries[i].defer_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&d.lease_expiry_ns, entries[i].lease_expiry_ns, __ATOMIC_RELAXED);
  }
  __atomic_store_n(&cb->num_entries, n, __ATOMIC_RELAXED);
  __atomic_store_n(&cb->seq, s + 2, __ATOMIC_RELEASE);  // data before seq even
}

}  // namespace vkick
