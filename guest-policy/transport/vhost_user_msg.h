// vhost-user wire format, frontend side (QEMU docs/interop/vhost-user.rst,
// "Message Specification"). Pure: building and checking messages as bytes;
// the socket I/O lives in vhost_user.cc.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace vkick::vhost_user {

// "Front-end message types".
enum Request : uint32_t {
  kGetFeatures = 1,
  kSetFeatures = 2,
  kSetOwner = 3,
  kResetOwner = 4,
  kSetMemTable = 5,
  kSetVringNum = 8,
  kSetVringAddr = 9,
  kSetVringBase = 10,
  kGetVringBase = 11,
  kSetVringKick = 12,
  kSetVringCall = 13,
  kGetProtocolFeatures = 15,
  kSetProtocolFeatures = 16,
  kGetQueueNum = 17,
  kSetVringEnable = 18,
  kGetConfig = 24,
};

// Header flags: bits 0-1 version (1), bit 2 reply, bit 3 need_reply.
inline constexpr uint32_t kVersion = 0x1;
inline constexpr uint32_t kFlagReply = 0x4;
inline constexpr uint32_t kFlagNeedReply = 0x8;

inline constexpr uint64_t kFProtocolFeatures = 1ull << 30;  // VHOST_USER_F_PROTOCOL_FEATURES
// "Protocol features".
inline constexpr uint64_t kPfMq = 1ull << 0;
inline constexpr uint64_t kPfReplyAck = 1ull << 3;
inline constexpr uint64_t kPfConfig = 1ull << 9;

// SET_VRING_KICK/CALL payload: bits 0-7 queue index, bit 8 "no fd" (polling).
inline constexpr uint64_t kVringNoFdMask = 1ull << 8;
inline constexpr size_t kMaxMemRegions = 8;
inline constexpr size_t kHeaderBytes = 12;
inline constexpr uint32_t kMaxPayload = 4096;  // we never accept more

struct Header {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
};
static_assert(sizeof(Header) == kHeaderBytes);

struct MemRegion {
  uint64_t guest_phys_addr;
  uint64_t memory_size;
  uint64_t userspace_addr;
  uint64_t mmap_offset;
};
struct VringState {
  uint32_t index;
  uint32_t num;
};
struct VringAddr {
  uint32_t index;
  uint32_t flags;
  uint64_t desc_user_addr;
  uint64_t used_user_addr;
  uint64_t avail_user_addr;
  uint64_t log_guest_addr;
};
static_assert(sizeof(VringAddr) == 40);
struct ConfigHeader {
  uint32_t offset;
  uint32_t size;
  uint32_t flags;
};

// A message as bytes (header + payload).
std::vector<uint8_t> Encode(uint32_t request, uint32_t flags, std::span<const uint8_t> payload);
std::vector<uint8_t> EncodeU64(uint32_t request, uint32_t flags, uint64_t v);
std::vector<uint8_t> EncodeVringState(uint32_t request, uint32_t flags, uint32_t index, uint32_t num);
std::vector<uint8_t> EncodeVringAddr(uint32_t flags, const VringAddr& a);
std::vector<uint8_t> EncodeMemTable(uint32_t flags, std::span<const MemRegion> regions);
std::vector<uint8_t> EncodeGetConfig(uint32_t offset, uint32_t size);

// Checks a reply header against the request it answers.
absl::Status CheckReplyHeader(const Header& h, uint32_t request, uint32_t expect_size_min,
                              uint32_t expect_size_max);
// The u64 payload of GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, and
// REPLY_ACK (0 = success).
absl::StatusOr<uint64_t> DecodeU64(std::span<const uint8_t> payload);
// GET_CONFIG's reply: the config bytes after the 12-byte config header.
absl::StatusOr<std::vector<uint8_t>> DecodeConfig(std::span<const uint8_t> payload, uint32_t want_size);

const char* RequestName(uint32_t request);

}  // namespace vkick::vhost_user
