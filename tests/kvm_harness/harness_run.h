// Runs vkick-kvm-harness for the probe tests: forks it, lets a callback
// track its pid (the child waits on a pipe before exec), returns its JSON
// summary. Shared by harness_probes_test (integration) and
// kvm_tracepoints_bpf_test (bpf).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "controller/probes/probe_backend.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace vkick::testing {

// Tracks the harness process `pid` as `vm_id` with its two notify targets:
// the MMIO address (device 1, queue 0) and the legacy PIO port (device 2).
inline absl::Status TrackHarness(ProbeBackend& probes, pid_t pid, uint32_t vm_id,
                                 uint64_t mmio_addr, uint16_t pio_port) {
  if (absl::Status s = probes.TrackProcess(pid, vm_id); !s.ok()) return s;
  const NotifyTarget targets[] = {NotifyTarget::Mmio(mmio_addr, 1, 0),
                                  NotifyTarget::LegacyPio(pio_port, 2)};
  return probes.SetNotifyTargets(vm_id, targets);
}

struct HarnessRun {
  int wait_status = -1;
  nlohmann::json summary;
};

// Forks the harness, lets `track(pid)` run before the harness starts (the
// child blocks on a pipe before exec), returns its JSON summary.
inline HarnessRun RunHarness(const std::vector<std::string>& args,
               const std::function<absl::Status(pid_t)>& track) {
  HarnessRun run;
  int go[2], out[2];
  if (pipe2(go, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2";
    return run;
  }
  pid_t pid = fork();
  if (pid == 0) {
    char c;
    if (read(go[0], &c, 1) != 1) _exit(120);
    dup2(out[1], STDOUT_FILENO);
    std::vector<char*> argv{const_cast<char*>(VKICK_HARNESS_PATH)};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(VKICK_HARNESS_PATH, argv.data());
    _exit(127);
  }
  close(go[0]);
  close(out[1]);
  absl::Status s = pid > 0 ? track(pid) : absl::InternalError("fork failed");
  char c = 'g';
  if (!s.ok() || write(go[1], &c, 1) != 1) {
    ADD_FAILURE() << "tracking the harness: " << s;
    if (pid > 0) kill(pid, SIGKILL);
  }
  close(go[1]);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) text.append(buf, n);
  close(out[0]);
  if (pid > 0) waitpid(pid, &run.wait_status, 0);
  run.summary = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return run;
}

}  // namespace vkick::testing
