// vkickd: attaches to VMs over their QMP sockets, programs the eBPF host
// probes with each virtqueue's notify address and serves the counts on
// Prometheus /metrics.
//
//   vkickd --qmp=/run/vm1.qmp --qmp=/run/vm2.qmp --listen=127.0.0.1:9470
//
// Flags live here only; everything else is constructed from them and passed
// down (no globals). SIGINT/SIGTERM stop the daemon cleanly.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "controller/daemon/daemon.h"
#include "controller/daemon/log.h"
#include "controller/daemon/wiring.h"
#include "exporters/http_server.h"
#include "exporters/vkick_collector.h"

ABSL_FLAG(std::vector<std::string>, qmp, {},
          "QMP socket of a VM (QEMU -qmp unix:PATH,server=on,wait=off); repeat the flag (or "
          "give a comma-separated list) for several VMs. Without it vkickd serves its own "
          "metrics only.");
ABSL_FLAG(std::string, listen, "127.0.0.1:9470",
          "HOST:PORT to serve /metrics and /healthz on (IPv4 literal; port 0 picks a free one).");
ABSL_FLAG(absl::Duration, refresh_interval, absl::Seconds(1),
          "Re-read every VM over QMP this often (BARs are assigned after start and may move); "
          "QMP events trigger an earlier refresh.");
ABSL_FLAG(absl::Duration, qmp_timeout, absl::Seconds(2),
          "Deadline of one QMP exchange; a VM that does not answer in time is a timeout error.");
ABSL_FLAG(bool, no_probes, false,
          "Run without the eBPF host probes (no root needed): discovery and self-metrics only.");

#ifndef VKICK_VERSION
#define VKICK_VERSION "unknown"
#endif

namespace {

// Abseil keeps only the last occurrence of a repeated flag; --qmp is meant to
// be repeated, so gather every occurrence ("--qmp=X", "--qmp X", "-qmp=X")
// up to "--". Comma-separated lists are split as Abseil would.
std::vector<std::string> RepeatedFlag(int argc, char** argv, absl::string_view name) {
  std::vector<std::string> out;
  auto add = [&](absl::string_view v) {
    for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipEmpty())) out.emplace_back(p);
  };
  const std::string eq1 = absl::StrCat("--", name, "="), eq2 = absl::StrCat("-", name, "=");
  const std::string bare1 = absl::StrCat("--", name), bare2 = absl::StrCat("-", name);
  for (int i = 1; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "--") break;
    if (absl::ConsumePrefix(&a, eq1) || absl::ConsumePrefix(&a, eq2)) {
      add(a);
    } else if ((a == bare1 || a == bare2) && i + 1 < argc) {
      add(argv[++i]);
    }
  }
  return out;
}

// The documented spelling is --no-probes / --refresh-interval; Abseil flag
// names are C++ identifiers. Accept both by rewriting dashes in flag names
// (never in values, never after "--").
std::vector<char*> NormalizeFlagNames(int argc, char** argv, std::vector<std::string>& storage) {
  storage.assign(argv, argv + argc);
  for (int i = 1; i < argc; ++i) {
    std::string& a = storage[i];
    if (a == "--") break;
    if (a.size() < 2 || a[0] != '-') continue;
    size_t start = a[1] == '-' ? 2 : 1;
    size_t end = std::min(a.find('='), a.size());
    for (size_t j = start; j < end; ++j) {
      if (a[j] == '-') a[j] = '_';
    }
  }
  std::vector<char*> out;
  for (auto& s : storage) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

int Fail(absl::string_view msg) {
  vkick::LogToStderr(msg);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "vkickd --qmp=PATH [--qmp=PATH...] [--listen=127.0.0.1:9470] [--no-probes]\n"
      "Counts virtio kicks and VM exits of QEMU VMs with eBPF and serves them on /metrics.");
  std::vector<std::string> arg_storage;
  std::vector<char*> args = NormalizeFlagNames(argc, argv, arg_storage);
  argv = args.data();
  absl::ParseCommandLine(argc, argv);

  vkick::DaemonOptions options;
  // A QMP chardev serves one client at a time: a path given twice would
  // have its second attachment hang. Keep the first occurrence.
  for (std::string& p : RepeatedFlag(argc, argv, "qmp")) {
    if (std::find(options.qmp_paths.begin(), options.qmp_paths.end(), p) ==
        options.qmp_paths.end()) {
      options.qmp_paths.push_back(std::move(p));
    } else {
      vkick::LogToStderr(absl::StrCat("--qmp=", p, " given twice; attaching once"));
    }
  }
  options.refresh_interval = absl::GetFlag(FLAGS_refresh_interval);
  const std::string listen = absl::GetFlag(FLAGS_listen);
  if (options.refresh_interval <= absl::ZeroDuration()) {
    return Fail("--refresh-interval must be positive");
  }
  if (auto addr = vkick::ParseListenAddress(listen); !addr.ok()) {
    return Fail(addr.status().message());
  }

  // Probes first: the one start-up step that needs privileges.
  std::unique_ptr<vkick::ProbeBackend> probes;
  if (!absl::GetFlag(FLAGS_no_probes)) {
    auto p = vkick::CreateHostProbes();
    if (!p.ok()) {
      std::string why = p.status().ToString();
      if (geteuid() != 0) {
        why = absl::StrCat("not running as root (uid ", geteuid(),
                           "; the probes need CAP_BPF and CAP_PERFMON): ", why);
      }
      return Fail(absl::StrCat(
          "cannot attach the eBPF host probes: ", why,
          ". They need BPF and tracepoints (/sys/kernel/btf/vmlinux, tracefs mounted at "
          "/sys/kernel/tracing). Run as root, or pass --no-probes to run without them."));
    }
    probes = *std::move(p);
  }

  // Signals go to sigwait() below, not to whichever thread runs: block them
  // before any thread (attachments, civetweb) exists.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  vkick::Daemon daemon(options, probes.get(),
                       vkick::QmpDiscoveryFactory(absl::GetFlag(FLAGS_qmp_timeout)));
  auto collector = std::make_shared<vkick::VkickCollector>(daemon, vkick::ExitReasonNames(),
                                                           VKICK_VERSION);
  auto server = vkick::MetricsHttpServer::Start(listen, {collector}, [&daemon] {
    vkick::Daemon::Health h = daemon.CheckHealth();
    return vkick::HealthResult{h.ok, h.reason};
  });
  if (!server.ok()) return Fail(server.status().message());

  daemon.Start();
  vkick::LogToStderr(absl::StrCat(
      "vkickd ", VKICK_VERSION, " listening on ", (*server)->url(), "/metrics (probes ",
      probes ? "attached" : "disabled by --no-probes", ", ", options.qmp_paths.size(),
      " QMP socket(s)", options.qmp_paths.empty() ? "" : ": ",
      absl::StrJoin(options.qmp_paths, ", "), ")"));

  int sig = 0;
  sigwait(&stop_signals, &sig);
  vkick::LogToStderr(absl::StrCat("received ", sig == SIGINT ? "SIGINT" : "SIGTERM",
                                  ", shutting down"));
  server->reset();  // no scrape runs past this point
  daemon.Stop();    // joins attachments, untracks every VM
  probes.reset();   // detaches the BPF programs
  vkick::LogToStderr("stopped");
  return 0;
}
