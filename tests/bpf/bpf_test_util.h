// Shared by the BPF tests: create HostProbes or skip with the reason.
#pragma once

#include <unistd.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "controller/probes/host_probes.h"
#include "gtest/gtest.h"

namespace vkick::testing {

// Fake tgids for BPF_PROG_TEST_RUN: above the kernel's PID_MAX_LIMIT (2^22),
// so no real process (another engineer's QEMU...) can ever collide.
inline constexpr uint32_t kFakeTgid1 = 0x7f000001;
inline constexpr uint32_t kFakeTgid2 = 0x7f000002;
inline constexpr uint32_t kFakeTgid3 = 0x7f000003;

// Returns null and sets *skip to a reason when the machine cannot load the
// probes (not root, BPF unavailable); any other failure is a test failure.
inline std::unique_ptr<HostProbes> CreateProbesOrSkip(const HostProbesOptions& options,
                                                      std::string* skip) {
  if (geteuid() != 0) {
    *skip = "not root: loading BPF programs needs CAP_BPF and CAP_PERFMON";
    return nullptr;
  }
  auto p = HostProbes::Create(options);
  if (!p.ok()) {
    if (absl::IsPermissionDenied(p.status())) {
      *skip = "BPF not permitted here: " + p.status().ToString();
      return nullptr;
    }
    ADD_FAILURE() << "HostProbes::Create: " << p.status();
    return nullptr;
  }
  return *std::move(p);
}

// Small maps (the default 4096-VM ones take ~0.3 s to preallocate per test),
// which also exercises the sizing from a capacity.
inline constexpr ProbeCapacity kTestCapacity{64, 8, 4};

inline HostProbesOptions NothingAttached() {
  HostProbesOptions o;
  o.attach_exits = o.attach_notifications = o.attach_interrupts = o.attach_vhost_user = false;
  o.capacity = kTestCapacity;
  return o;
}

// Runs the notify program's SEC("syscall") twin `times` times, as `tgid`
// writing `val` to `addr`.
inline void RunIo(HostProbes& p, uint32_t tgid, NotifyTarget::Space space, uint64_t addr, uint64_t val,
                  int times) {
  vkick_test_io_ctx ctx{};
  ctx.tgid = tgid;
  ctx.space = static_cast<uint32_t>(space);
  ctx.addr = addr;
  ctx.val = val;
  for (int i = 0; i < times; ++i) {
    absl::Status s = p.TestRunIo(ctx);
    ASSERT_TRUE(s.ok()) << s;
  }
}

}  // namespace vkick::testing

// In a TEST body: creates `var` or skips / fails.
#define VKICK_PROBES_OR_SKIP(var, options)                           \
  std::string var##_skip;                                            \
  auto var = ::vkick::testing::CreateProbesOrSkip(options, &var##_skip); \
  if (var == nullptr) {                                              \
    if (!var##_skip.empty()) GTEST_SKIP() << var##_skip;             \
    return;                                                          \
  }
