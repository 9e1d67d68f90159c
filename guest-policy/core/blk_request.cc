#include "guest-policy/core/blk_request.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {
template <typename T>
T ReadLe(std::span<const uint8_t> b, size_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof(T));
  return v;
}
}  // namespace

absl::StatusOr<BlkConfig> ParseBlkConfig(std::span<const uint8_t> bytes, uint64_t features) {
  if (bytes.size() < 8) {
    return absl::InvalidArgumentError(absl::StrCat("virtio-blk config too short: ", bytes.size(), " bytes"));
  }
  BlkConfig c;
  c.capacity_sectors = ReadLe<uint64_t>(bytes, 0);
  if (bytes.size() >= 16) {
    if (features & kVirtioBlkFSizeMax) c.size_max = ReadLe<uint32_t>(bytes, 8);
    if (features & kVirtioBlkFSegMax) c.seg_max = ReadLe<uint32_t>(bytes, 12);
  }
  if (bytes.size() >= 24 && (features & kVirtioBlkFBlkSize)) {
    c.blk_size = ReadLe<uint32_t>(bytes, 20);
    // 5.2.4: blk_size is the optimal/logical block size; reject nonsense so a
    // bad device cannot make us divide by zero or issue misaligned I/O.
    if (c.blk_size < 512 || c.blk_size > (1u << 20) || (c.blk_size & (c.blk_size - 1)) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("bad blk_size ", c.blk_size));
    }
  }
  if (bytes.size() >= 36 && (features & kVirtioBlkFMq)) {
    c.num_queues = ReadLe<uint16_t>(bytes, 34);
    if (c.num_queues == 0) return absl::InvalidArgumentError("device reports 0 queues");
  }
  return c;
}

absl::StatusOr<std::vector<Segment>> EncodeBlkRequest(BlkOp op, uint64_t sector,
                                                      const BlkRequestBuffers& b,
                                                      const BlkConfig& cfg) {
  if (b.hdr == nullptr) return absl::InvalidArgumentError("no header buffer");
  std::vector<Segment> segs;
  segs.reserve(3);
  segs.push_back({b.hdr_iova, sizeof(VirtioBlkOutHdr), false});
  switch (op) {
    case BlkOp::kRead:
    case BlkOp::kWrite: {
      if (b.data_len == 0 || b.data_len % kSectorSize != 0) {
        return absl::InvalidArgumentError(absl::StrCat("length ", b.data_len, " is not a positive multiple of 512"));
      }
      if (cfg.size_max != 0 && b.data_len > cfg.size_max) {
        return absl::InvalidArgumentError(absl::StrCat("length ", b.data_len, " > device size_max ", cfg.size_max));
      }
      const uint64_t sectors = b.data_len / kSectorSize;
      if (sector > cfg.capacity_sectors || sectors > cfg.capacity_sectors - sector) {
        return absl::OutOfRangeError(absl::StrCat("sectors ", sector, "+", sectors, " beyond capacity ",
                                                  cfg.capacity_sectors));
      }
      segs.push_back({b.data_iova, b.data_len, op == BlkOp::kRead});
      break;
    }
    case BlkOp::kFlush:
      sector = 0;  // 5.2.6: "sector ... MUST be zero" for flush... (it is ignored)
      break;
    case BlkOp::kGetId:
      if (b.data_len < kVirtioBlkIdBytes) return absl::InvalidArgumentError("GET_ID needs a 20-byte buffer");
      segs.push_back({b.data_iova, kVirtioBlkIdBytes, true});
      sector = 0;
      break;
    default:
      return absl::InvalidArgumentError("unknown op");
  }
  b.hdr->type = static_cast<uint32_t>(op);
  b.hdr->reserved = 0;
  b.hdr->sector = sector;
  segs.push_back({b.status_iova, 1, true});
  return segs;
}

absl::Status BlkStatusToStatus(uint8_t status) {
  switch (status) {
    case kVirtioBlkSOk: return absl::OkStatus();
    case kVirtioBlkSIoErr: return absl::DataLossError("virtio-blk: I/O error (VIRTIO_BLK_S_IOERR)");
    case kVirtioBlkSUnsupp: return absl::UnimplementedError("virtio-blk: unsupported request (VIRTIO_BLK_S_UNSUPP)");
    default: return absl::InternalError(absl::StrCat("virtio-blk: invalid status byte ", status));
  }
}

std::string ParseBlkId(std::span<const uint8_t> bytes) {
  size_t n = 0;
  while (n < bytes.size() && n < kVirtioBlkIdBytes && bytes[n] != 0) ++n;
  return std::string(reinterpret_cast<const char*>(bytes.data()), n);
}

}  // namespace vkick
