#include "guest-policy/core/blk_request.h"

#include <cstring>

#include "gtest/gtest.h"

namespace vkick {
namespace {

BlkConfig Cfg() {
  BlkConfig c;
  c.capacity_sectors = 2048;
  return c;
}

TEST(BlkRequest, ReadIsHeaderDataWritableStatusWritable) {
  VirtioBlkOutHdr hdr;
  BlkRequestBuffers b{&hdr, 0x1000, 0x2000, 4096, 0x3000};
  auto segs = EncodeBlkRequest(BlkOp::kRead, 8, b, Cfg());
  ASSERT_TRUE(segs.ok()) << segs.status();
  ASSERT_EQ(segs->size(), 3u);
  EXPECT_EQ(hdr.type, 0u);
  EXPECT_EQ(hdr.sector, 8u);
  EXPECT_EQ((*segs)[0].iova, 0x1000u);
  EXPECT_FALSE((*segs)[0].device_writes);
  EXPECT_EQ((*segs)[0].len, 16u);
  EXPECT_TRUE((*segs)[1].device_writes);
  EXPECT_EQ((*segs)[1].len, 4096u);
  EXPECT_EQ((*segs)[2].iova, 0x3000u);
  EXPECT_EQ((*segs)[2].len, 1u);
  EXPECT_TRUE((*segs)[2].device_writes);
}

TEST(BlkRequest, WriteDataIsDeviceReadable) {
  VirtioBlkOutHdr hdr;
  BlkRequestBuffers b{&hdr, 0x1000, 0x2000, 512, 0x3000};
  auto segs = EncodeBlkRequest(BlkOp::kWrite, 2047, b, Cfg());
  ASSERT_TRUE(segs.ok());
  EXPECT_EQ(hdr.type, 1u);
  EXPECT_FALSE((*segs)[1].device_writes);
}

TEST(BlkRequest, FlushAndGetId) {
  VirtioBlkOutHdr hdr;
  BlkRequestBuffers b{&hdr, 0x1000, 0x2000, 0, 0x3000};
  auto f = EncodeBlkRequest(BlkOp::kFlush, 77, b, Cfg());
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->size(), 2u);
  EXPECT_EQ(hdr.type, 4u);
  EXPECT_EQ(hdr.sector, 0u);
  EXPECT_FALSE(EncodeBlkRequest(BlkOp::kGetId, 0, b, Cfg()).ok());  // no 20-byte buffer
  b.data_len = 20;
  auto g = EncodeBlkRequest(BlkOp::kGetId, 0, b, Cfg());
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(hdr.type, 8u);
  EXPECT_EQ((*g)[1].len, 20u);
  EXPECT_TRUE((*g)[1].device_writes);
  const uint8_t id[20] = {'q', 's', 'd', 0};
  EXPECT_EQ(ParseBlkId(id), "qsd");
}

TEST(BlkRequest, RejectsBadLengthsAndOutOfRange) {
  VirtioBlkOutHdr hdr;
  BlkRequestBuffers b{&hdr, 0x1000, 0x2000, 100, 0x3000};
  EXPECT_FALSE(EncodeBlkRequest(BlkOp::kRead, 0, b, Cfg()).ok());
  b.data_len = 1024;
  EXPECT_EQ(EncodeBlkRequest(BlkOp::kRead, 2047, b, Cfg()).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(EncodeBlkRequest(BlkOp::kRead, ~0ull, b, Cfg()).status().code(), absl::StatusCode::kOutOfRange);
  BlkConfig c = Cfg();
  c.size_max = 512;
  EXPECT_FALSE(EncodeBlkRequest(BlkOp::kRead, 0, b, c).ok());
}

TEST(BlkRequest, StatusByte) {
  EXPECT_TRUE(BlkStatusToStatus(0).ok());
  EXPECT_EQ(BlkStatusToStatus(1).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(BlkStatusToStatus(2).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(BlkStatusToStatus(0xff).code(), absl::StatusCode::kInternal);
}

TEST(BlkConfig, ParsesFieldsOnlyWhenFeatureNegotiated) {
  uint8_t raw[kBlkConfigBytes] = {};
  uint64_t cap = 1 << 21;
  uint32_t seg_max = 126, blk = 4096;
  uint16_t nq = 4;
  std::memcpy(raw, &cap, 8);
  std::memcpy(raw + 12, &seg_max, 4);
  std::memcpy(raw + 20, &blk, 4);
  std::memcpy(raw + 34, &nq, 2);
  auto c = ParseBlkConfig(raw, kVirtioBlkFSegMax | kVirtioBlkFBlkSize | kVirtioBlkFMq);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->capacity_sectors, cap);
  EXPECT_EQ(c->seg_max, 126u);
  EXPECT_EQ(c->blk_size, 4096u);
  EXPECT_EQ(c->num_queues, 4);
  auto d = ParseBlkConfig(raw, 0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->num_queues, 1);
  EXPECT_EQ(d->blk_size, 512u);
  blk = 1000;
  std::memcpy(raw + 20, &blk, 4);
  EXPECT_FALSE(ParseBlkConfig(raw, kVirtioBlkFBlkSize).ok());
  EXPECT_FALSE(ParseBlkConfig(std::span<const uint8_t>(raw, 4), 0).ok());
}

}  // namespace
}  // namespace vkick
