// The shared header's structs are the ABI between the BPF object and C++:
// pin their layout (no implicit padding, sizes the BPF side was built with)
// and the constants that must agree with the C++ interface.
#include <cstddef>

#include "bpf/host_probes.h"
#include "controller/probes/probe_backend.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

static_assert(sizeof(vkick_notify_key) == 16 && offsetof(vkick_notify_key, addr) == 8);
static_assert(sizeof(vkick_notify_target) == 12 + 4 * VKICK_TARGET_SLOTS &&
              offsetof(vkick_notify_target, slots) == 12);
// The program masks a legacy value with VKICK_TARGET_SLOTS - 1.
static_assert((VKICK_TARGET_SLOTS & (VKICK_TARGET_SLOTS - 1)) == 0);
static_assert(VKICK_TARGET_SLOTS <= VKICK_MAX_QUEUE);
static_assert(VKICK_TGID_WORDS * 64 == VKICK_TGID_BITS);
static_assert(sizeof(vkick_exit_key) == 16);
static_assert(sizeof(vkick_queue_key) == 8 && offsetof(vkick_queue_key, queue) == 6);
static_assert(sizeof(vkick_unmatched_key) == 8);
static_assert(sizeof(vkick_irq_key) == 16 && offsetof(vkick_irq_key, address) == 8);
static_assert(sizeof(vkick_sock_key) == 8);
static_assert(sizeof(vkick_kick_value) == 8);
static_assert(sizeof(vkick_path_key) == VKICK_PATH_KEY_SIZE);
static_assert(VKICK_PATH_KEY_SIZE >= VKICK_SUN_PATH_MAX + 1);  // a full sun_path plus NUL
static_assert(sizeof(vkick_frontend_value) == 8);
static_assert(sizeof(vkick_test_exit_ctx) == 16);
static_assert(sizeof(vkick_test_io_ctx) == 24 && offsetof(vkick_test_io_ctx, addr) == 8);
static_assert(sizeof(vkick_test_msi_ctx) == 24);

TEST(HostProbesLayoutTest, ConstantsAgreeWithTheInterface) {
  EXPECT_EQ(VKICK_SPACE_MMIO, static_cast<int>(NotifyTarget::Space::kMmio));
  EXPECT_EQ(VKICK_SPACE_PIO, static_cast<int>(NotifyTarget::Space::kPio));
  EXPECT_EQ(VKICK_UNKNOWN_DEVICE, kUnknownDevice);
  // The BPF side keeps queue indices in u16 and device ids in u16.
  EXPECT_LE(VKICK_MAX_QUEUE, 0x10000);
  EXPECT_EQ(sizeof(NotificationCount::queue), sizeof(vkick_queue_key::queue));
  EXPECT_EQ(sizeof(NotificationCount::device_id), sizeof(vkick_queue_key::device_id));
  EXPECT_EQ(VKICK_ERR_COUNT, 4);
  EXPECT_EQ(sizeof(FrontendInfo::device_id), sizeof(vkick_frontend_value::device_id));
}

TEST(HostProbesLayoutTest, KeysHaveNoUninitialisedPadding) {
  // Hash keys are compared bytewise by the kernel: every byte must be a
  // named field (explicit pad members), so value-initialised keys built on
  // both sides match. Sum of member sizes == struct size proves it.
  EXPECT_EQ(sizeof(vkick_notify_key), 4 + 1 + 3 + 8u);
  // Not a key, but compared field by field and written whole: no holes.
  EXPECT_EQ(sizeof(vkick_notify_target), 4 + 2 + 2 + 1 + 3 + 4u * VKICK_TARGET_SLOTS);
  EXPECT_EQ(sizeof(vkick_exit_key), 4 * 4u);
  EXPECT_EQ(sizeof(vkick_queue_key), 4 + 2 + 2u);
  EXPECT_EQ(sizeof(vkick_irq_key), 4 + 4 + 8u);
  EXPECT_EQ(sizeof(vkick_path_key), static_cast<size_t>(VKICK_PATH_KEY_SIZE));
}

}  // namespace
}  // namespace vkick
