#include "guest-policy/transport/vhost_user_msg.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace vkick::vhost_user {
namespace {
template <typename T>
std::span<const uint8_t> Bytes(const T& v) {
  return {reinterpret_cast<const uint8_t*>(&v), sizeof(T)};
}
}  // namespace

std::vector<uint8_t> Encode(uint32_t request, uint32_t flags, std::span<const uint8_t> payload) {
  Header h{request, kVersion | flags, static_cast<uint32_t>(payload.size())};
  std::vector<uint8_t> out(kHeaderBytes + payload.size());
  std::memcpy(out.data(), &h, kHeaderBytes);
  if (!payload.empty()) std::memcpy(out.data() + kHeaderBytes, payload.data(), payload.size());
  return out;
}

std::vector<uint8_t> EncodeU64(uint32_t request, uint32_t flags, uint64_t v) {
  return Encode(request, flags, Bytes(v));
}

std::vector<uint8_t> EncodeVringState(uint32_t request, uint32_t flags, uint32_t index, uint32_t num) {
  VringState s{index, num};
  return Encode(request, flags, Bytes(s));
}

std::vector<uint8_t> EncodeVringAddr(uint32_t flags, const VringAddr& a) {
  return Encode(kSetVringAddr, flags, Bytes(a));
}

std::vector<uint8_t> EncodeMemTable(uint32_t flags, std::span<const MemRegion> regions) {
  // struct { u32 nregions; u32 padding; MemRegion regions[8]; }: the payload
  // size covers all 8 slots, as QEMU sends it.
  std::vector<uint8_t> p(8 + kMaxMemRegions * sizeof(MemRegion), 0);
  const uint32_t n = static_cast<uint32_t>(std::min(regions.size(), kMaxMemRegions));
  std::memcpy(p.data(), &n, 4);
  std::memcpy(p.data() + 8, regions.data(), n * sizeof(MemRegion));
  return Encode(kSetMemTable, flags, p);
}

std::vector<uint8_t> EncodeGetConfig(uint32_t offset, uint32_t size) {
  std::vector<uint8_t> p(sizeof(ConfigHeader) + size, 0);
  ConfigHeader c{offset, size, 0};
  std::memcpy(p.data(), &c, sizeof(c));
  return Encode(kGetConfig, 0, p);
}

absl::Status CheckReplyHeader(const Header& h, uint32_t request, uint32_t min, uint32_t max) {
  if ((h.flags & 0x3) != kVersion) {
    return absl::DataLossError(absl::StrCat("vhost-user: reply with version ", h.flags & 3, " (want 1)"));
  }
  if (!(h.flags & kFlagReply)) return absl::DataLossError("vhost-user: message without the reply flag");
  if (h.request != request) {
    return absl::DataLossError(absl::StrCat("vhost-user: reply to ", RequestName(h.request), " while waiting for ",
                                            RequestName(request)));
  }
  if (h.size < min || h.size > max) {
    return absl::DataLossError(absl::StrCat("vhost-user: ", RequestName(request), " reply of ", h.size, " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> DecodeU64(std::span<const uint8_t> payload) {
  if (payload.size() != 8) return absl::DataLossError(absl::StrCat("vhost-user: u64 payload of ", payload.size(), " bytes"));
  uint64_t v;
  std::memcpy(&v, payload.data(), 8);
  return v;
}

absl::StatusOr<std::vector<uint8_t>> DecodeConfig(std::span<const uint8_t> payload, uint32_t want) {
  if (payload.size() < sizeof(ConfigHeader)) return absl::DataLossError("vhost-user: GET_CONFIG reply too short");
  ConfigHeader c;
  std::memcpy(&c, payload.data(), sizeof(c));
  if (c.size != want || payload.size() != sizeof(ConfigHeader) + want) {
    // libvhost-user answers a failed get_config with size 0.
    return absl::UnavailableError(absl::StrCat("vhost-user: GET_CONFIG returned ", c.size, " bytes (asked ", want, ")"));
  }
  return std::vector<uint8_t>(payload.begin() + sizeof(ConfigHeader), payload.end());
}

const char* RequestName(uint32_t r) {
  switch (r) {
    case kGetFeatures: return "GET_FEATURES";
    case kSetFeatures: return "SET_FEATURES";
    case kSetOwner: return "SET_OWNER";
    case kResetOwner: return "RESET_OWNER";
    case kSetMemTable: return "SET_MEM_TABLE";
    case kSetVringNum: return "SET_VRING_NUM";
    case kSetVringAddr: return "SET_VRING_ADDR";
    case kSetVringBase: return "SET_VRING_BASE";
    case kGetVringBase: return "GET_VRING_BASE";
    case kSetVringKick: return "SET_VRING_KICK";
    case kSetVringCall: return "SET_VRING_CALL";
    case kGetProtocolFeatures: return "GET_PROTOCOL_FEATURES";
    case kSetProtocolFeatures: return "SET_PROTOCOL_FEATURES";
    case kGetQueueNum: return "GET_QUEUE_NUM";
    case kSetVringEnable: return "SET_VRING_ENABLE";
    case kGetConfig: return "GET_CONFIG";
  }
  return "UNKNOWN";
}

}  // namespace vkick::vhost_user
