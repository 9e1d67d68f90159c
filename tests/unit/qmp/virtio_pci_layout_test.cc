// Notify-address layout: legacy, modern, page-per-vq, transitional, modern
// PIO notify, unassigned BARs, and inconsistent inputs.
#include "controller/discovery/virtio_pci_layout.h"

#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

PciDevice Device(std::vector<PciBar> bars, uint16_t pci_device_id = 0x1001) {
  PciDevice d;
  d.slot = 4;
  d.vendor_id = kVirtioPciVendor;
  d.device_id = pci_device_id;
  d.bars = std::move(bars);
  return d;
}

PciBar Io(int index, uint64_t addr, uint64_t size = 128) {
  return PciBar{.index = index, .io = true, .address = addr, .size = size, .assigned = addr != 0};
}
PciBar Mem(int index, uint64_t addr, uint64_t size) {
  return PciBar{.index = index, .io = false, .address = addr, .size = size, .assigned = addr != 0};
}

TEST(VirtioPciLayout, LegacyIsOnePortWithQueueAsValue) {
  VirtioPciProps p{.disable_legacy = false, .disable_modern = true, .num_queues = 2};
  absl::StatusOr<VirtioPciLayout> l =
      ComputeVirtioPciLayout(Device({Io(0, 0xc000), Mem(1, 0xfe800000, 4096)}), p, 7);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_TRUE(l->legacy);
  EXPECT_FALSE(l->modern);
  ASSERT_EQ(l->targets.size(), 1u);
  EXPECT_EQ(l->targets[0].space, NotifyTarget::Space::kPio);
  EXPECT_EQ(l->targets[0].addr, 0xc000u + 16);  // VIRTIO_PCI_QUEUE_NOTIFY
  EXPECT_TRUE(l->targets[0].value_is_queue);
  EXPECT_EQ(l->targets[0].device_id, 7);
}

TEST(VirtioPciLayout, ModernQueuesFourBytesApart) {
  VirtioPciProps p{.disable_legacy = true, .disable_modern = false, .num_queues = 3};
  absl::StatusOr<VirtioPciLayout> l = ComputeVirtioPciLayout(
      Device({Mem(1, 0xfea01000, 4096), Mem(4, 0xfe000000, 16384)}, 0x1042), p, 1);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_FALSE(l->legacy);
  EXPECT_TRUE(l->modern);
  ASSERT_EQ(l->targets.size(), 3u);
  for (uint16_t q = 0; q < 3; ++q) {
    EXPECT_EQ(l->targets[q].space, NotifyTarget::Space::kMmio);
    // The address the brief measured: BAR4 + 0x3000 + 4 * queue.
    EXPECT_EQ(l->targets[q].addr, 0xfe003000u + 4u * q);
    EXPECT_EQ(l->targets[q].queue, q);
    EXPECT_FALSE(l->targets[q].value_is_queue);
    EXPECT_EQ(l->targets[q].device_id, 1);
  }
}

TEST(VirtioPciLayout, PagePerVqQueuesAPageApart) {
  VirtioPciProps p{.disable_legacy = true, .disable_modern = false, .page_per_vq = true,
                   .num_queues = 3};
  absl::StatusOr<VirtioPciLayout> l =
      ComputeVirtioPciLayout(Device({Mem(4, 0xfd800000, 8 << 20)}, 0x1042), p, 0);
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_EQ(l->targets.size(), 3u);
  EXPECT_EQ(l->targets[0].addr, 0xfd803000u);
  EXPECT_EQ(l->targets[1].addr, 0xfd804000u);
  EXPECT_EQ(l->targets[2].addr, 0xfd805000u);
}

TEST(VirtioPciLayout, TransitionalDeviceGetsBothInterfaces) {
  VirtioPciProps p{.disable_legacy = false, .disable_modern = false, .num_queues = 2};
  absl::StatusOr<VirtioPciLayout> l = ComputeVirtioPciLayout(
      Device({Io(0, 0xd080), Mem(1, 0xfea03000, 4096), Mem(4, 0xfe200000, 16384)}), p, 3);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_TRUE(l->legacy && l->modern);
  ASSERT_EQ(l->targets.size(), 3u);
  EXPECT_EQ(l->targets[0].addr, 0xd090u);
  EXPECT_EQ(l->targets[1].addr, 0xfe203000u);
  EXPECT_EQ(l->targets[2].addr, 0xfe203004u);
}

TEST(VirtioPciLayout, ModernPioNotifyAddsThePortOnBar2) {
  VirtioPciProps p{.disable_legacy = true, .disable_modern = false, .modern_pio_notify = true,
                   .num_queues = 1};
  absl::StatusOr<VirtioPciLayout> l =
      ComputeVirtioPciLayout(Device({Io(2, 0xc040, 4), Mem(4, 0xfe000000, 16384)}, 0x1042), p, 0);
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_EQ(l->targets.size(), 2u);
  EXPECT_EQ(l->targets[1].space, NotifyTarget::Space::kPio);
  EXPECT_EQ(l->targets[1].addr, 0xc040u);
  EXPECT_TRUE(l->targets[1].value_is_queue);
}

TEST(VirtioPciLayout, UnassignedBarsGiveNoTargetsYet) {
  VirtioPciProps p{.disable_legacy = false, .disable_modern = false, .num_queues = 2};
  absl::StatusOr<VirtioPciLayout> l =
      ComputeVirtioPciLayout(Device({Io(0, 0), Mem(1, 0, 4096), Mem(4, 0, 16384)}), p, 0);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_TRUE(l->legacy && l->modern);
  EXPECT_TRUE(l->targets.empty());
  // Missing BARs: the same.
  absl::StatusOr<VirtioPciLayout> none = ComputeVirtioPciLayout(Device({}), p, 0);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->targets.empty());
}

TEST(VirtioPciLayout, WithoutPropertiesTheBarsDecide) {
  VirtioPciProps unknown{.num_queues = 2};
  absl::StatusOr<VirtioPciLayout> l =
      ComputeVirtioPciLayout(Device({Mem(1, 0xfea01000, 4096), Mem(4, 0xfe000000, 16384)}),
                             unknown, 0);
  ASSERT_TRUE(l.ok());
  EXPECT_FALSE(l->legacy);
  EXPECT_TRUE(l->modern);
  EXPECT_EQ(l->targets.size(), 2u);
  // Modern with an unknown queue count: nothing to guess.
  VirtioPciProps no_queues{.disable_legacy = true, .disable_modern = false};
  EXPECT_TRUE(ComputeVirtioPciLayout(Device({Mem(4, 0xfe000000, 16384)}), no_queues, 0)
                  ->targets.empty());
}

TEST(VirtioPciLayout, InconsistentInputsAreErrors) {
  VirtioPciProps p{.disable_legacy = true, .disable_modern = false, .num_queues = 8};
  // 0x3000 + 8 pages does not fit a 16 KiB BAR.
  VirtioPciProps ppv = p;
  ppv.page_per_vq = true;
  EXPECT_EQ(ComputeVirtioPciLayout(Device({Mem(4, 0xfe000000, 16384)}), ppv, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  PciDevice not_virtio = Device({Mem(4, 0xfe000000, 16384)});
  not_virtio.vendor_id = 0x8086;
  EXPECT_FALSE(ComputeVirtioPciLayout(not_virtio, p, 0).ok());
  VirtioPciProps too_many = p;
  too_many.num_queues = 2000;
  EXPECT_FALSE(ComputeVirtioPciLayout(Device({Mem(4, 0xfe000000, 8 << 20)}), too_many, 0).ok());
  VirtioPciProps legacy{.disable_legacy = false, .disable_modern = true};
  EXPECT_FALSE(ComputeVirtioPciLayout(Device({Io(0, 0xc000, 8)}), legacy, 0).ok());
}

TEST(VirtioPciLayout, RealQueryPciOfQemu72) {
  std::ifstream in(std::string(VKICK_QMP_TESTDATA) + "/query-pci.json");
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<nlohmann::json> msg = ParseQmpMessage(ss.str().substr(0, ss.str().find('\n')));
  ASSERT_TRUE(msg.ok()) << msg.status();
  absl::StatusOr<std::vector<PciDevice>> devs = ParseQueryPci((*msg)["return"]);
  ASSERT_TRUE(devs.ok());
  for (const PciDevice& d : *devs) {
    if (d.qdev_id != "modern0") continue;
    // capture_qmp.py: disable-legacy=on, num-queues=3, page-per-vq=on.
    VirtioPciProps p{.disable_legacy = true, .disable_modern = false, .page_per_vq = true,
                     .num_queues = 3};
    absl::StatusOr<VirtioPciLayout> l = ComputeVirtioPciLayout(d, p, 0);
    ASSERT_TRUE(l.ok()) << l.status();
    ASSERT_EQ(l->targets.size(), 3u);
    EXPECT_EQ(l->targets[2].addr, 0xfd800000u + 0x3000 + 2 * 0x1000);
    return;
  }
  FAIL() << "modern0 not in testdata";
}

}  // namespace
}  // namespace vkick
