#include <cerrno>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/errno_status.h"
#include "common/flags.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

using Args = std::vector<std::string>;

TEST(Flags, DashesInNamesBecomeUnderscoresNeverInValuesOrAfterDoubleDash) {
  EXPECT_EQ(NormalizeFlagNames({"vkickd", "--no-probes", "--state-dir=/a-b", "-admin-group", "x-y", "--", "--keep-me"}),
            (Args{"vkickd", "--no_probes", "--state_dir=/a-b", "-admin_group", "x-y", "--", "--keep-me"}));
}

TEST(Flags, ARepeatableFlagKeepsEveryOccurrenceInEverySpelling) {
  const Args args = {"vkickd", "--qmp=/a", "--listen=x", "--qmp", "/b", "-qmp=/c,/d", "-qmp", "/e", "--qmpx=/no",
                     "--", "--qmp=/after"};
  EXPECT_EQ(RepeatedFlagValues(args, "qmp"), (Args{"/a", "/b", "/c", "/d", "/e"}));
  EXPECT_TRUE(RepeatedFlagValues(args, "vhost_user").empty());
}

TEST(ErrnoStatus, TheCodeFollowsTheErrnoAndTheMessageSaysWhatAndWhy) {
  absl::Status s = ErrnoStatus(-EPERM, "bpf_prog_load", "needs CAP_BPF");
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(s.message(), "bpf_prog_load: Operation not permitted (errno 1); needs CAP_BPF");
  EXPECT_EQ(ErrnoStatus(ENOENT, "open /x").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ErrnoStatus(ENOENT, "open /x", "hint").message(), "open /x: No such file or directory (errno 2)");
}

TEST(Clock, Monotonic) {
  const uint64_t a = MonotonicNowNs(), b = MonotonicNowNs();
  EXPECT_LE(a, b);
  EXPECT_GT(a, 0u);
}

}  // namespace
}  // namespace vkick
