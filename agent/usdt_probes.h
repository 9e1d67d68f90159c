// UsdtProbes: the CounterSource over the libbpf skeleton of
// bpf/vkick_agent.bpf.c. RAII: Create() opens and loads; Track()/AttachBinary()
// attach the three USDT programs (vkick:submit, vkick:kick, vkick:complete);
// the destructor detaches and frees everything.
//
// Not thread-safe (the agent calls it from its one loop thread).
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "agent/counter_source.h"
#include "bpf/vkick_agent.h"

struct vkick_agent;  // generated skeleton (vkick_agent.skel.h)
struct bpf_link;

namespace vkick::agent {

class UsdtProbes final : public CounterSource {
 public:
  // Errors: kPermissionDenied without CAP_BPF/CAP_PERFMON, kInternal else.
  static absl::StatusOr<std::unique_ptr<UsdtProbes>> Create();
  ~UsdtProbes() override;
  UsdtProbes(const UsdtProbes&) = delete;
  UsdtProbes& operator=(const UsdtProbes&) = delete;

  // Attach to every process running `binary`, present and future (pid -1):
  // nothing a driver does before the agent sees its registry entry is missed.
  absl::Status AttachBinary(const std::string& binary);

  // CounterSource. Track attaches per pid unless the pid's executable is
  // already covered by AttachBinary.
  absl::Status Track(const TrackedDriver& d) override;
  void Untrack(int32_t pid) override;
  absl::StatusOr<CounterSnapshot> Read() override;

  // For tests: runs the SEC("syscall") program (the USDT handlers' counting
  // code with arguments from ctx) through BPF_PROG_TEST_RUN; its retval.
  absl::StatusOr<int> TestRun(const vkick_agent_test_ctx& ctx);

 private:
  explicit UsdtProbes(vkick_agent* skel, int num_cpus) : skel_(skel), num_cpus_(num_cpus) {}
  absl::Status AttachAll(int pid, const std::string& binary, std::vector<bpf_link*>* links);

  vkick_agent* skel_;
  int num_cpus_;
  std::map<std::string, std::vector<bpf_link*>> binary_links_;  // AttachBinary
  std::set<std::string> binary_inodes_;                         // "dev:ino" of those binaries
  std::map<int32_t, std::vector<bpf_link*>> pid_links_;
};

}  // namespace vkick::agent
