// The adaptive policy's control block: a small file (typically under
// /dev/shm/vkick/) that the guest agent writes and vkick-blk maps read-only.
// Fixed-width fields, explicit padding, little-endian; layout frozen by the
// static_asserts below and documented in docs/kick-policies.md.
//
// Concurrency: a seqlock. The writer makes `seq` odd, writes the entries, then
// makes `seq` even again (release order); a reader retries while `seq` is odd
// or changed. Every field is validated and clamped on read: the writer is
// trusted no more than any other input.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>

namespace vkick {

inline constexpr uint32_t kControlBlockMagic = 0x42434B56;  // "VKCB" little-endian
inline constexpr uint16_t kControlBlockVersion = 1;
inline constexpr uint16_t kControlBlockMaxQueues = 16;
inline constexpr uint64_t kControlMaxDeferNs = 1'000'000;  // T <= 1 ms

// Numbering shared with protocol/messages.h KickMode.
enum class ControlMode : uint8_t { kImmediate = 0, kEventIdx = 1, kStatic = 2, kAdaptive = 3 };

struct ControlEntry {          // 24 bytes
  uint8_t mode;                // ControlMode; kAdaptive here means kStatic
  uint8_t reserved0;
  uint16_t batch;              // B (static, event-idx): clamped to 1..queue size
  uint32_t defer_ns;           // T (static, event-idx): clamped to <= 1 ms
  uint64_t lease_expiry_ns;    // CLOCK_MONOTONIC; 0 or past = expired
  uint64_t reserved1;
};
static_assert(sizeof(ControlEntry) == 24);
static_assert(offsetof(ControlEntry, lease_expiry_ns) == 8);

struct ControlBlock {          // 64 + 16 * 24 = 448 bytes
  uint32_t magic;              // kControlBlockMagic
  uint16_t version;            // kControlBlockVersion
  uint16_t size;               // sizeof(ControlBlock)
  uint32_t seq;                // seqlock generation: odd while being written
  uint16_t num_entries;        // 1..16; queue q uses entries[q < num ? q : 0]
  uint16_t reserved0;
  uint64_t writer_pid;         // informational
  uint64_t reserved[5];
  ControlEntry entries[kControlBlockMaxQueues];
};
static_assert(sizeof(ControlBlock) == 448);
static_assert(offsetof(ControlBlock, seq) == 8);
static_assert(offsetof(ControlBlock, entries) == 64);

// The validated, clamped view of one queue's entry.
struct ControlSnapshot {
  ControlMode mode = ControlMode::kImmediate;
  uint32_t batch = 1;
  uint64_t defer_ns = 0;
  uint64_t lease_expiry_ns = 0;
  friend bool operator==(const ControlSnapshot&, const ControlSnapshot&) = default;
};

enum class ControlReadError : uint8_t { kNone, kAbsent, kBadMagic, kBadVersion, kBadSize, kBusy, kBadEntry };
const char* ControlReadErrorName(ControlReadError e);

struct ControlReadResult {
  std::optional<ControlSnapshot> snapshot;
  ControlReadError error = ControlReadError::kNone;
};

// Reads queue `queue`'s entry (bounded seqlock retries; a writer stuck with an
// odd seq yields kBusy, never a hang). `queue_size` bounds B.
ControlReadResult ReadControlBlock(const ControlBlock* cb, uint16_t queue, uint32_t queue_size);

// Writer side, for the guest agent and tests: initialises the header (once),
// then publishes entries under the seqlock.
void InitControlBlock(ControlBlock* cb, uint64_t writer_pid);
void WriteControlEntries(ControlBlock* cb, const ControlEntry* entries, uint16_t n);

}  // namespace vkick
