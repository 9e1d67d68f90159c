// virtio-blk request encoding (virtio 1.2, section 5.2 "Block Device"). Pure:
// turns an operation into the header bytes and the segment list a virtqueue
// takes, and parses the device configuration space.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "guest-policy/core/virtqueue.h"

namespace vkick {

// 5.2.3 "Feature bits".
inline constexpr uint64_t kVirtioBlkFSizeMax = 1ull << 1;
inline constexpr uint64_t kVirtioBlkFSegMax = 1ull << 2;
inline constexpr uint64_t kVirtioBlkFRo = 1ull << 5;
inline constexpr uint64_t kVirtioBlkFBlkSize = 1ull << 6;
inline constexpr uint64_t kVirtioBlkFFlush = 1ull << 9;
inline constexpr uint64_t kVirtioBlkFMq = 1ull << 12;

// 5.2.6 "Device Operation": request types and status values.
enum class BlkOp : uint32_t { kRead = 0, kWrite = 1, kFlush = 4, kGetId = 8 };
inline constexpr uint8_t kVirtioBlkSOk = 0;
inline constexpr uint8_t kVirtioBlkSIoErr = 1;
inline constexpr uint8_t kVirtioBlkSUnsupp = 2;
inline constexpr uint32_t kSectorSize = 512;   // the unit of `sector`, always
inline constexpr uint32_t kVirtioBlkIdBytes = 20;

struct VirtioBlkOutHdr {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(VirtioBlkOutHdr) == 16);

// The part of struct virtio_blk_config (5.2.4) the driver uses.
struct BlkConfig {
  uint64_t capacity_sectors = 0;
  uint32_t size_max = 0;   // valid with SIZE_MAX
  uint32_t seg_max = 0;    // valid with SEG_MAX
  uint32_t blk_size = 512; // valid with BLK_SIZE
  uint16_t num_queues = 1; // valid with MQ
};
inline constexpr size_t kBlkConfigBytes = 36;  // through num_queues
absl::StatusOr<BlkConfig> ParseBlkConfig(std::span<const uint8_t> bytes, uint64_t features);

// Device-visible addresses of one request's buffers.
struct BlkRequestBuffers {
  VirtioBlkOutHdr* hdr = nullptr;  // driver VA of the header
  uint64_t hdr_iova = 0;
  uint64_t data_iova = 0;
  uint32_t data_len = 0;
  uint64_t status_iova = 0;
};

// Fills the header and returns the segments (header RO, data RO/WO, status WO):
// 5.2.6 "the driver MUST place the header ... device-readable, data, then the
// status byte device-writable". Validates length and alignment.
absl::StatusOr<std::vector<Segment>> EncodeBlkRequest(BlkOp op, uint64_t sector,
                                                      const BlkRequestBuffers& b,
                                                      const BlkConfig& cfg);

// Maps the status byte to a Status (OK, IOERR, UNSUPP, anything else).
absl::Status BlkStatusToStatus(uint8_t status);

// GET_ID: the device returns up to 20 bytes, NUL-padded if shorter.
std::string ParseBlkId(std::span<const uint8_t> bytes);

}  // namespace vkick
