// vkick-agent: the guest side of the vkick loop. See docs/agent.md.
#include <signal.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "agent/agent.h"
#include "agent/block_observer.h"
#include "agent/stats_source.h"
#include "agent/usdt_probes.h"
#include "common/clock.h"
#include "common/flags.h"

ABSL_FLAG(std::string, connect, "", "vkickd's agent unix socket (vhost-user drivers on the host)");
ABSL_FLAG(std::string, port_name, "org.vkick.agent.0",
          "virtio-serial port name (/sys/class/virtio-ports/*/name) when --connect is not given");
ABSL_FLAG(absl::Duration, interval, absl::Seconds(1), "sampling interval (10ms..60s)");
ABSL_FLAG(std::string, run_dir, "", "driver registry root (<run_dir>/drivers/<pid>.json); default $VKICK_RUN_DIR or /run/vkick");
ABSL_FLAG(std::string, control_dir, "/dev/shm/vkick",
          "the only directory control blocks may live in (registry entries naming others are ignored)");
ABSL_FLAG(std::string, agent_id, "", "agent id sent in hello ([A-Za-z0-9._:-], <= 64); default: hostname");
ABSL_FLAG(std::string, observe, "stats",
          "how vkick-blk drivers are observed: stats (read each driver's stats block once per interval: "
          "nothing per request) or usdt (eBPF uprobes on its USDT probes: a trap per request, for tracing)");
ABSL_FLAG(std::vector<std::string>, driver_binary, {},
          "--observe=usdt: vkick-blk executables to probe in every process, from start (no event missed "
          "before registration)");
ABSL_FLAG(bool, json, false, "print one JSON line per interval on stdout (without --connect: local only, no channel)");
ABSL_FLAG(bool, once, false, "sample one interval, print it as JSON and exit (no channel)");
ABSL_FLAG(int32_t, intervals, 0, "exit after this many intervals (0 = run until SIGINT/SIGTERM)");
ABSL_FLAG(bool, observe_kernel_disks, true,
          "also sample the kernel's own virtio_blk disks (block tracepoints; observe only, never policed). "
          "Disks of the vkick_virtio_blk module are sampled and steered through sysfs either way");

namespace {

volatile bool g_stop = false;
void OnSignal(int) { g_stop = true; }

// The drivers' counters: their stats blocks (default), or USDT uprobes.
absl::StatusOr<std::unique_ptr<vkick::agent::CounterSource>> MakeCounterSource(
    const std::string& observe, const std::vector<std::string>& binaries) {
  if (observe == "stats") {
    if (!binaries.empty()) vkick::agent::Log("--driver_binary is for --observe=usdt: ignored");
    return std::make_unique<vkick::agent::StatsSource>();
  }
  if (observe != "usdt") return absl::InvalidArgumentError("--observe must be stats or usdt");
  auto probes = vkick::agent::UsdtProbes::Create();
  if (!probes.ok()) return absl::Status(probes.status().code(), absl::StrCat("cannot load the BPF probes: ", probes.status().message()));
  for (const std::string& b : binaries) {
    if (b.empty()) continue;
    if (absl::Status s = (*probes)->AttachBinary(b); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("--driver_binary ", b, ": ", s.message()));
    }
    vkick::agent::Log(absl::StrCat("probing every process of ", b));
  }
  return std::unique_ptr<vkick::agent::CounterSource>(*std::move(probes));
}

std::string SanitizeId(std::string s) {
  std::string out;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == ':' || c == '-';
    out.push_back(ok ? c : '_');
    if (out.size() == vkick::proto::kMaxAgentIdLen) break;
  }
  return out.empty() ? "guest" : out;
}

int Main() {
  using vkick::agent::Log;
  vkick::agent::AgentOptions o;
  const absl::Duration interval = absl::GetFlag(FLAGS_interval);
  if (interval < absl::Milliseconds(10) || interval > absl::Seconds(60)) {
    std::fprintf(stderr, "vkick-agent: --interval must be in 10ms..60s\n");
    return 2;
  }
  o.interval_ns = static_cast<uint64_t>(absl::ToInt64Nanoseconds(interval));
  o.run_dir = absl::GetFlag(FLAGS_run_dir);
  if (o.run_dir.empty()) {
    const char* env = std::getenv("VKICK_RUN_DIR");
    o.run_dir = env && *env ? env : "/run/vkick";
  }
  o.control_dir = absl::GetFlag(FLAGS_control_dir);
  while (o.control_dir.size() > 1 && o.control_dir.back() == '/') o.control_dir.pop_back();
  if (o.control_dir.empty() || o.control_dir[0] != '/') {
    std::fprintf(stderr, "vkick-agent: --control_dir must be an absolute path\n");
    return 2;
  }
  std::string id = absl::GetFlag(FLAGS_agent_id);
  if (id.empty()) {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    id = host;
  }
  o.agent_id = SanitizeId(id);
  utsname u;
  if (uname(&u) == 0) {
    std::string k = u.release;
    if (k.size() > vkick::proto::kMaxKernelLen) k.resize(vkick::proto::kMaxKernelLen);
    for (char& c : k)
      if (c < 0x20 || c > 0x7e) c = '?';
    o.kernel = k;
  }
  const bool once = absl::GetFlag(FLAGS_once);
  o.json = absl::GetFlag(FLAGS_json) || once;
  o.max_intervals = once ? 1 : absl::GetFlag(FLAGS_intervals);
  o.connect_path = absl::GetFlag(FLAGS_connect);
  // --json/--once without --connect: a local dump, no channel.
  o.port_name = (o.connect_path.empty() && !o.json) ? absl::GetFlag(FLAGS_port_name) : "";
  if (once) o.connect_path.clear();

  auto counters = MakeCounterSource(absl::GetFlag(FLAGS_observe), absl::GetFlag(FLAGS_driver_binary));
  if (!counters.ok()) {
    Log(counters.status().ToString());
    return counters.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }

  // Kernel virtio_blk disks: optional. Without the block tracepoints as BTF
  // raw tracepoints (a kernel without BTF or older than 5.12) the agent runs
  // on, with vkick-blk sampling only.
  std::unique_ptr<vkick::agent::BlockObserver> block_observer;
  if (absl::GetFlag(FLAGS_observe_kernel_disks)) {
    auto b = vkick::agent::BlockObserver::Create();
    if (b.ok()) {
      block_observer = *std::move(b);
    } else {
      Log(absl::StrCat("kernel virtio_blk disks will not be observed: ", b.status().ToString(),
                       " (vkick-blk sampling unaffected)"));
    }
  }

  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // Signals are blocked except inside ppoll(): no lost wake-up.
  sigset_t block, run_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigprocmask(SIG_BLOCK, &block, &run_mask);
  sigdelset(&run_mask, SIGINT);
  sigdelset(&run_mask, SIGTERM);

  Log(absl::StrCat("started: registry ", o.run_dir, "/drivers, interval ", absl::FormatDuration(interval),
                   ", channel ",
                   !o.connect_path.empty() ? "unix:" + o.connect_path
                   : !o.port_name.empty() ? "virtio-serial:" + o.port_name
                                          : "none (local JSON)"));
  vkick::agent::Agent agent(o, counters->get(), vkick::MonotonicNowNs, &std::cout, block_observer.get());
  return agent.Run(&g_stop, &run_mask);
}

}  // namespace

int main(int argc, char** argv) {
  const vkick::CommandLine cl = vkick::ParseFlags(
      argc, argv,
      {.binary = "vkick-agent",
       .usage =
      "vkick-agent: samples vkick-blk's queues (their stats blocks, once per interval; --observe=usdt:\n"
      "eBPF on its USDT probes) and applies the host's kick policies; steers the disks of the\n"
      "vkick_virtio_blk kernel module the same way (sysfs stats and steer files); observes the\n"
      "kernel's own virtio_blk disks (eBPF on block tracepoints, no policy).\n"
      "  vkick-agent                                 # in a VM: virtio-serial port org.vkick.agent.0\n"
      "  vkick-agent --connect=/run/vkick/agent.sock # on the host, next to vhost-user drivers\n"
      "  vkick-agent --once                          # one interval as JSON, no host\n"
      "Needs root (CAP_BPF + CAP_PERFMON). Exit status: 0 ok, 1 setup failure, 2 bad flags.",
       .flags_source = "agent/main.cc"});
  if (!cl.positional.empty()) {
    std::fprintf(stderr, "vkick-agent: unexpected argument '%s' (see --help)\n", cl.positional[0].c_str());
    return 2;
  }
  return Main();
}
