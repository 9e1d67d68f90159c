#include "controller/probes/exit_reasons.h"

#include <set>
#include <string>

#include "gtest/gtest.h"

namespace vkick {
namespace {

TEST(ExitReasonsTest, VmxNamesAreTheKernels) {
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 0), "EXCEPTION_NMI");
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 12), "HLT");
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 30), "IO_INSTRUCTION");
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 48), "EPT_VIOLATION");
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 49), "EPT_MISCONFIG");
}

TEST(ExitReasonsTest, VmxUsesTheBasicReasonAndFlagsFailedEntry) {
  // Bits 16-30 (e.g. 27, "from SGX enclave mode") do not change the name.
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, (1u << 27) | 49), "EPT_MISCONFIG");
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 0x80000000u | 33), "FAILED_VMENTRY_INVALID_STATE");
}

TEST(ExitReasonsTest, SvmNamesAreTheKernels) {
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0x078), "hlt");
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0x07b), "io");
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0x400), "npf");
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0x040 + 14), "PF excp");  // exception exits by vector
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0xffffffffu), "invalid_guest_state");  // SVM_EXIT_ERR
}

TEST(ExitReasonsTest, UnknownIsNumbered) {
  EXPECT_EQ(ExitReasonName(kKvmIsaVmx, 999), "unknown_999");
  EXPECT_EQ(ExitReasonName(kKvmIsaSvm, 0x3ff), "unknown_1023");
  EXPECT_EQ(ExitReasonName(7, 12), "unknown_isa7_12");
}

TEST(ExitReasonsTest, VmxLabelSetIsBoundedByTheBasicReason) {
  // Every u32 whose low 16 bits agree maps to one of two names (with or
  // without the failed-entry prefix): 2^32 raw reasons give at most 2^17
  // labels.
  std::set<std::string> names;
  for (uint32_t hi = 0; hi < 0x10000; hi += 0x111) {
    names.insert(ExitReasonName(kKvmIsaVmx, (hi << 16) | 30));
  }
  EXPECT_EQ(names, (std::set<std::string>{"IO_INSTRUCTION", "FAILED_VMENTRY_IO_INSTRUCTION"}));
}

}  // namespace
}  // namespace vkick
