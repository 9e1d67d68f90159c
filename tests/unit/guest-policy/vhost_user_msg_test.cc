#include "guest-policy/transport/vhost_user_msg.h"

#include <cstring>

#include "gtest/gtest.h"

namespace vkick::vhost_user {
namespace {

Header HeaderOf(const std::vector<uint8_t>& m) {
  Header h;
  std::memcpy(&h, m.data(), sizeof(h));
  return h;
}

TEST(VhostUserMsg, HeaderCarriesVersionAndPayloadSize) {
  auto m = EncodeU64(kSetVringKick, 0, 3);
  ASSERT_EQ(m.size(), 20u);
  Header h = HeaderOf(m);
  EXPECT_EQ(h.request, 12u);  // the host probe keys on request 12 = SET_VRING_KICK
  EXPECT_EQ(h.flags, kVersion);
  EXPECT_EQ(h.size, 8u);
  EXPECT_EQ(m[12], 3);  // low byte of the u64: queue index
}

TEST(VhostUserMsg, VringAddrAndMemTableLayout) {
  VringAddr a{1, 0, 0x1000, 0x3000, 0x2000, 0};
  auto m = EncodeVringAddr(0, a);
  EXPECT_EQ(HeaderOf(m).size, 40u);
  uint64_t used;
  std::memcpy(&used, m.data() + 12 + 16, 8);
  EXPECT_EQ(used, 0x3000u);  // order: desc, used, avail
  MemRegion r{0x7f0000000000, 1 << 20, 0x7f0000000000, 0};
  auto t = EncodeMemTable(0, {&r, 1});
  EXPECT_EQ(HeaderOf(t).size, 8u + 8 * 32);
  EXPECT_EQ(t[12], 1);  // nregions
  uint64_t size;
  std::memcpy(&size, t.data() + 12 + 8 + 8, 8);
  EXPECT_EQ(size, 1u << 20);
}

TEST(VhostUserMsg, ReplyChecks) {
  EXPECT_TRUE(CheckReplyHeader({kGetFeatures, kVersion | kFlagReply, 8}, kGetFeatures, 8, 8).ok());
  EXPECT_FALSE(CheckReplyHeader({kGetFeatures, kVersion, 8}, kGetFeatures, 8, 8).ok());
  EXPECT_FALSE(CheckReplyHeader({kGetQueueNum, kVersion | kFlagReply, 8}, kGetFeatures, 8, 8).ok());
  EXPECT_FALSE(CheckReplyHeader({kGetFeatures, 2 | kFlagReply, 8}, kGetFeatures, 8, 8).ok());
  EXPECT_FALSE(CheckReplyHeader({kGetFeatures, kVersion | kFlagReply, 4}, kGetFeatures, 8, 8).ok());
  uint8_t v[8] = {7};
  EXPECT_EQ(*DecodeU64(v), 7u);
  EXPECT_FALSE(DecodeU64(std::span<const uint8_t>(v, 4)).ok());
}

TEST(VhostUserMsg, GetConfigRoundTrip) {
  auto m = EncodeGetConfig(0, 36);
  EXPECT_EQ(HeaderOf(m).size, 12u + 36);
  std::vector<uint8_t> reply(12 + 36, 0);
  uint32_t size = 36;
  std::memcpy(reply.data() + 4, &size, 4);
  reply[12] = 0x80;
  auto c = DecodeConfig(reply, 36);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)[0], 0x80);
  size = 0;  // libvhost-user's failure answer
  std::memcpy(reply.data() + 4, &size, 4);
  EXPECT_FALSE(DecodeConfig(reply, 36).ok());
}

}  // namespace
}  // namespace vkick::vhost_user
