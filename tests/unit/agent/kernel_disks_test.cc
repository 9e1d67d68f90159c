// Discovery of kernel virtio_blk disks on a fake sysfs tree built in a temp
// dir, laid out like the real one (symlinks included): /sys/block/<name> ->
// ../devices/.../<pci>/virtioN/block/<name>, its `device` -> ../../../virtioN,
// virtioN/driver -> .../drivers/virtio_blk.
#include "agent/kernel_disks.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "agent/counter_source.h"
#include "protocol/codec.h"
#include "gtest/gtest.h"

namespace vkick::agent {
namespace {

namespace fs = std::filesystem;

class KernelDisksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-kdisks-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    fs::create_directories(root_ + "/block");
    for (const char* d : {"virtio_blk", "vkick_virtio_blk", "virtio_net", "virtio_scsi"})
      fs::create_directories(root_ + "/bus/virtio/drivers/" + std::string(d));
  }
  void TearDown() override { fs::remove_all(root_); }

  static void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

  // A disk under `parent` (relative to devices/), e.g. "pci0000:00/0000:00:05.0".
  // serial == nullptr: no serial file.
  void AddVirtioDisk(const std::string& name, const std::string& parent, int virtio_index, const std::string& driver,
                     const std::string& dev, const char* serial, const std::string& nr_requests = "256\n") {
    const std::string vdev = "devices/" + parent + "/virtio" + std::to_string(virtio_index);
    const std::string disk = vdev + "/block/" + name;
    fs::create_directories(root_ + "/" + disk + "/queue");
    if (!fs::exists(root_ + "/" + vdev + "/driver"))
      fs::create_directory_symlink(root_ + "/bus/virtio/drivers/" + driver, root_ + "/" + vdev + "/driver");
    fs::create_directory_symlink("../../../virtio" + std::to_string(virtio_index), root_ + "/" + disk + "/device");
    Write(root_ + "/" + disk + "/dev", dev);
    if (serial != nullptr) Write(root_ + "/" + disk + "/serial", serial);
    Write(root_ + "/" + disk + "/queue/nr_requests", nr_requests);
    fs::create_directory_symlink("../" + disk, root_ + "/block/" + name);
  }
  // A disk of the vkick_virtio_blk module: its vkick/queues holds `queues`
  // (nullptr: no such file).
  void AddVkickDisk(const std::string& name, const std::string& pci, int virtio_index, const std::string& dev,
                    const char* queues) {
    AddVirtioDisk(name, "pci0000:00/" + pci, virtio_index, "vkick_virtio_blk", dev, nullptr);
    if (queues == nullptr) return;
    fs::create_directories(root_ + "/block/" + name + "/vkick");
    Write(root_ + "/block/" + name + "/vkick/queues", queues);
  }
  void AddVirtualDisk(const std::string& name, const std::string& dev) {
    const std::string disk = "devices/virtual/block/" + name;
    fs::create_directories(root_ + "/" + disk + "/queue");
    Write(root_ + "/" + disk + "/dev", dev);
    fs::create_directory_symlink("../" + disk, root_ + "/block/" + name);
  }

  std::string root_;
};

TEST_F(KernelDisksTest, FindsVirtioBlkDisksWithTheirPciFunctionDevAndSerial) {
  AddVirtioDisk("vda", "pci0000:00/0000:00:05.0", 2, "virtio_blk", "254:0\n", "disk-a\n");
  AddVirtioDisk("vdb", "pci0000:00/0000:00:01.0/0000:01:1f.7", 3, "virtio_blk", "254:16\n", nullptr, "64\n");
  AddVirtualDisk("loop0", "7:0\n");
  // A SCSI disk behind virtio-scsi: its device link is not virtioN.
  const std::string scsi = "devices/pci0000:00/0000:00:06.0/virtio4";
  const std::string sda = scsi + "/host0/target0:0:0/0:0:0:0/block/sda";
  fs::create_directories(root_ + "/" + sda);
  fs::create_directory_symlink(root_ + "/bus/virtio/drivers/virtio_scsi", root_ + "/" + scsi + "/driver");
  fs::create_directory_symlink("../../../0:0:0:0", root_ + "/" + sda + "/device");
  fs::create_directory_symlink("../" + sda, root_ + "/block/sda");

  KernelDiskScan scan = DiscoverKernelDisks(root_);
  EXPECT_TRUE(scan.skipped.empty());
  ASSERT_EQ(scan.disks.size(), 2u);
  const KernelDisk& a = scan.disks[0];
  EXPECT_EQ(a.name, "vda");
  EXPECT_EQ(a.pci, "0000:00:05.0");
  EXPECT_EQ(a.major, 254u);
  EXPECT_EQ(a.minor, 0u);
  EXPECT_EQ(a.serial, "disk-a");
  EXPECT_EQ(a.queue_size, 256);
  EXPECT_EQ(KernelDevOf(a), (254u << 20) | 0u);
  const KernelDisk& b = scan.disks[1];
  EXPECT_EQ(b.name, "vdb");
  EXPECT_EQ(b.pci, "0000:01:1f.7");  // the function right above virtioN, behind a bridge
  EXPECT_EQ(b.minor, 16u);
  EXPECT_EQ(b.serial, "");
  EXPECT_EQ(b.queue_size, 64);
  EXPECT_EQ(KernelDevOf(b), KernelDev(254, 16));

  const proto::GuestDevice g = ToGuestDevice(b);
  EXPECT_EQ(g.pci_domain, 0);
  EXPECT_EQ(g.pci_bus, 1);
  EXPECT_EQ(g.pci_devfn, (0x1f << 3) | 7);
  EXPECT_EQ(g.num_queues, 1);
  EXPECT_EQ(g.queue_size, 64);
  EXPECT_EQ(g.driver, proto::DriverKind::kKernel);
}

TEST_F(KernelDisksTest, FindsVkickVirtioBlkDisksWithTheirQueues) {
  AddVirtioDisk("vda", "pci0000:00/0000:00:05.0", 2, "virtio_blk", "254:0\n", "stock\n");
  AddVkickDisk("vkda", "0000:00:06.0", 3, "253:0\n", "4\n");
  Write(root_ + "/block/vkda/serial", "steered\n");

  KernelDiskScan scan = DiscoverKernelDisks(root_);
  EXPECT_TRUE(scan.skipped.empty());
  ASSERT_EQ(scan.disks.size(), 2u);
  EXPECT_EQ(scan.disks[0].name, "vda");
  EXPECT_EQ(scan.disks[0].driver, proto::DriverKind::kKernel);
  EXPECT_EQ(scan.disks[0].num_queues, 1);
  const KernelDisk& v = scan.disks[1];
  EXPECT_EQ(v.name, "vkda");
  EXPECT_EQ(v.driver, proto::DriverKind::kVkickVirtioBlk);
  EXPECT_EQ(v.num_queues, 4);
  EXPECT_EQ(v.pci, "0000:00:06.0");
  EXPECT_EQ(v.serial, "steered");
  EXPECT_EQ(KernelDevOf(v), KernelDev(253, 0));
  const proto::GuestDevice g = ToGuestDevice(v);
  EXPECT_EQ(g.driver, proto::DriverKind::kVkickVirtioBlk);
  EXPECT_EQ(g.num_queues, 4);
  EXPECT_EQ(g.pci_devfn, 6 << 3);
  EXPECT_EQ(proto::Validate(proto::Hello{.agent_id = "a", .kernel = "", .devices = {g}}), proto::Rejection::kNone);

  // Without the block observer the stock disk is not even looked at; the
  // module's disk needs nothing but sysfs.
  scan = DiscoverKernelDisks(root_, {}, /*stock_virtio_blk=*/false);
  ASSERT_EQ(scan.disks.size(), 1u);
  EXPECT_EQ(scan.disks[0].name, "vkda");
}

TEST_F(KernelDisksTest, VkickQueueCountIsBounded) {
  AddVkickDisk("vkda", "0000:00:02.0", 0, "253:0", "64\n");
  AddVkickDisk("vkdb", "0000:00:03.0", 1, "253:16", "0\n");
  AddVkickDisk("vkdc", "0000:00:04.0", 2, "253:32", "65\n");
  AddVkickDisk("vkdd", "0000:00:07.0", 3, "253:48", "four\n");
  AddVkickDisk("vkde", "0000:00:08.0", 4, "253:64", nullptr);
  AddVkickDisk("vkdf", "0000:00:09.0", 5, "253:80", "99999999999999999999999\n");
  KernelDiskScan scan = DiscoverKernelDisks(root_);
  ASSERT_EQ(scan.disks.size(), 1u);
  EXPECT_EQ(scan.disks[0].name, "vkda");
  EXPECT_EQ(scan.disks[0].num_queues, 64);
  ASSERT_EQ(scan.skipped.size(), 5u);
  for (const std::string& why : scan.skipped)
    EXPECT_NE(why.find(": unreadable vkick/queues, or not in 1..64"), std::string::npos) << why;
}

TEST_F(KernelDisksTest, IgnoresOtherDriversAndSkipsWhatCannotBeAnnounced) {
  // virtioN bound to another driver (never a disk in practice, but the link decides).
  AddVirtioDisk("vdx", "pci0000:00/0000:00:07.0", 5, "virtio_net", "254:32\n", "x");
  // virtio-mmio: no PCI function to announce.
  AddVirtioDisk("vdm", "platform/10001000.virtio_mmio", 0, "virtio_blk", "254:48\n", "m");
  // Malformed dev.
  AddVirtioDisk("vdz", "pci0000:00/0000:00:08.0", 6, "virtio_blk", "garbage\n", "z");
  KernelDiskScan scan = DiscoverKernelDisks(root_);
  EXPECT_TRUE(scan.disks.empty());
  ASSERT_EQ(scan.skipped.size(), 2u);
  EXPECT_NE(scan.skipped[0].find("vdm: not on PCI"), std::string::npos) << scan.skipped[0];
  EXPECT_NE(scan.skipped[1].find("vdz: unreadable or malformed dev"), std::string::npos) << scan.skipped[1];
  // No sysfs at all: nothing, no crash.
  EXPECT_TRUE(DiscoverKernelDisks(root_ + "/nonexistent").disks.empty());
}

TEST_F(KernelDisksTest, SerialAndQueueSizeAreSanitised) {
  AddVirtioDisk("vda", "pci0000:00/0000:00:02.0", 0, "virtio_blk", "254:0", "has space\n", "100000\n");
  AddVirtioDisk("vdb", "pci0000:00/0000:00:03.0", 1, "virtio_blk", "254:16", "123456789012345678901\n", "0\n");
  AddVirtioDisk("vdc", "pci0000:00/0000:00:04.0", 2, "virtio_blk", "254:32", "12345678901234567890\n", "junk");
  AddVirtioDisk("vdd", "pci0000:00/0000:00:09.0", 3, "virtio_blk", "254:48", "\x01\x02", "128");
  KernelDiskScan scan = DiscoverKernelDisks(root_);
  ASSERT_EQ(scan.disks.size(), 4u);
  EXPECT_EQ(scan.disks[0].serial, "");
  EXPECT_EQ(scan.disks[0].queue_size, 32768);
  EXPECT_EQ(scan.disks[1].serial, "");  // 21 bytes
  EXPECT_EQ(scan.disks[1].queue_size, 1);
  EXPECT_EQ(scan.disks[2].serial, "12345678901234567890");  // exactly 20
  EXPECT_EQ(scan.disks[2].queue_size, 256);                 // unreadable: the default
  EXPECT_EQ(scan.disks[3].serial, "");

  EXPECT_EQ(SanitizeSerial("ok-1_2:3\n"), "ok-1_2:3");
  EXPECT_EQ(SanitizeSerial(""), "");
  EXPECT_EQ(SanitizeSerial("a\tb"), "");
  EXPECT_EQ(SanitizeSerial("caf\xc3\xa9"), "");
}

TEST_F(KernelDisksTest, NaturalOrderAndTheDeviceBound) {
  // 18 disks: vda..vdq, vdz, vdaa: only 16 can be announced.
  std::vector<std::string> names;
  for (char c = 'a'; c <= 'q'; ++c) names.push_back(std::string("vd") + c);
  names.push_back("vdaa");
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string pci = "pci0000:00/0000:00:" + std::string(i < 16 ? "0" : "1") + "0123456789abcdef"[i % 16] + ".0";
    AddVirtioDisk(names[i], pci, static_cast<int>(i), "virtio_blk", "254:" + std::to_string(i * 16), nullptr);
  }
  KernelDiskScan scan = DiscoverKernelDisks(root_);
  ASSERT_EQ(scan.disks.size(), proto::kMaxDevices);
  EXPECT_EQ(scan.disks.front().name, "vda");
  EXPECT_EQ(scan.disks.back().name, "vdp");
  ASSERT_EQ(scan.skipped.size(), 2u);
  EXPECT_EQ(scan.skipped[0].rfind("vdq: more than 16", 0), 0u) << scan.skipped[0];
  EXPECT_EQ(scan.skipped[1].rfind("vdaa: more than 16", 0), 0u) << scan.skipped[1];
}

TEST_F(KernelDisksTest, ASerialIsReadOnceAndNotOnEveryRescan) {
  AddVirtioDisk("vda", "pci0000:00/0000:00:05.0", 2, "virtio_blk", "254:0\n", "first\n");
  KernelDiskScan first = DiscoverKernelDisks(root_);
  ASSERT_EQ(first.disks.size(), 1u);
  EXPECT_EQ(first.disks[0].serial, "first");
  // Reading `serial` is a request to the device: a known disk is not asked again.
  Write(root_ + "/block/vda/serial", "second\n");
  KernelDiskScan again = DiscoverKernelDisks(root_, first.disks);
  EXPECT_EQ(again.disks[0].serial, "first");
  // Another disk at that name/dev_t (hot-swapped to another PCI function) is.
  KernelDisk moved = first.disks[0];
  moved.pci = "0000:00:06.0";
  EXPECT_EQ(DiscoverKernelDisks(root_, {moved}).disks[0].serial, "second");
}

}  // namespace
}  // namespace vkick::agent
