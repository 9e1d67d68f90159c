// vkickd: attaches to VMs over their QMP sockets, programs the eBPF host
// probes with each virtqueue's notify address and serves the counts on
// Prometheus /metrics.
//
//   vkickd --qmp=/run/vm1.qmp --qmp=/run/vm2.qmp --listen=127.0.0.1:9470
//
// Flags live here only; everything else is constructed from them and passed
// down (no globals). SIGINT/SIGTERM stop the daemon cleanly.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "controller/daemon/daemon.h"
#include "controller/admin/admin_server.h"
#include "controller/channel/agent_server.h"
#include "controller/daemon/log.h"
#include "controller/daemon/loop_runner.h"
#include "controller/daemon/wiring.h"
#include "exporters/http_server.h"
#include "exporters/vkick_collector.h"

ABSL_FLAG(std::vector<std::string>, qmp, {},
          "QMP socket of a VM (QEMU -qmp unix:PATH,server=on,wait=off); repeat the flag (or "
          "give a comma-separated list) for several VMs. Without it vkickd serves its own "
          "metrics only.");
ABSL_FLAG(std::string, qmp_dir, "",
          "Directory of QMP sockets: every unix socket that appears in it is a VM (attached as "
          "with --qmp), dropped when it goes (inotify). For libvirt and KubeVirt hosts: "
          "docs/operations.md. Empty = off.");
ABSL_FLAG(std::string, listen, "127.0.0.1:9470",
          "HOST:PORT to serve /metrics and /healthz on (IPv4 literal; port 0 picks a free one).");
ABSL_FLAG(absl::Duration, refresh_interval, absl::Seconds(10),
          "Re-read every VM over QMP at least this often. QMP events (reset, device removal, "
          "resume) trigger a refresh at once, and a VM whose BARs are not assigned yet (a "
          "booting guest) is re-read from every 1s, backing off to this.");
ABSL_FLAG(absl::Duration, departed_retention, absl::Seconds(60),
          "A VM that went away stays on /metrics with its final counts this long, so the "
          "kicks since the last scrape are not lost; make it longer than two scrape intervals. "
          "0 drops its series at once.");
ABSL_FLAG(absl::Duration, qmp_timeout, absl::Seconds(2),
          "Deadline of one QMP exchange; a VM that does not answer in time is a timeout error.");
ABSL_FLAG(std::string, agent_socket, "",
          "Unix socket (mode 0660) vkickd listens on for vkick-agent connections of host-process "
          "drivers (vhost-user frontends such as vkick-blk); empty = off.");
ABSL_FLAG(std::vector<std::string>, vhost_user, {},
          "ID=SOCKET_PATH: a host-process vhost-user driver whose agent connects to "
          "--agent-socket and reports serial ID; its queues are labelled vm=--vhost-user-vm, "
          "device=ID. With the probes, a frontend that connect()s to SOCKET_PATH (made "
          "canonical with realpath) is tracked from that moment and its kicks are host-counted. "
          "Repeatable.");
ABSL_FLAG(std::string, vhost_user_vm, "vhost-user",
          "The `vm` label of the --vhost-user drivers (they run on the host, not in a VM).");
ABSL_FLAG(absl::Duration, control_interval, absl::Seconds(1),
          "Run the control loop (read counters and samples, compute and send policies) this "
          "often.");
ABSL_FLAG(absl::Duration, lease, absl::Seconds(5),
          "Lease sent with every policy and renewed every --control-interval; an agent that "
          "hears nothing for this long falls back to the driver's default. 10ms..60s, longer "
          "than --control-interval.");
ABSL_FLAG(std::string, default_policy, "immediate",
          "Policy of queues no entry covers: immediate | event-idx | adaptive | static:B,T (T in us). "
          "`vkickctl policy set --all` replaces it (persisted in --state-dir).");
ABSL_FLAG(std::string, state_dir, "/var/lib/vkick",
          "Where policy changes are persisted and restored from at start. If the default is "
          "unusable vkickd runs without persistence (logged); a given path must work.");
ABSL_FLAG(std::string, admin_socket, "/run/vkick/admin.sock",
          "Unix socket for vkickctl (mode 0600, or 0660 with --admin-group). If the default "
          "cannot be opened vkickd runs without it (logged); a given path must work.");
ABSL_FLAG(std::string, admin_group, "",
          "Group (name) whose members may use the admin socket besides root.");
ABSL_FLAG(bool, no_probes, false,
          "Run without the eBPF host probes (no root needed): discovery and self-metrics only.");
ABSL_FLAG(bool, vhost_user_kicks, false,
          "Also count kicks that are write() calls on an eventfd (vhost-user frontends on the host, "
          "QEMU under TCG) with syscall tracepoints. Exact, but while they are attached every "
          "syscall of every process on the host takes the kernel's tracing path: on the "
          "vhost-user testbed vkick-blk ran at 0.55-0.75x its IOPS at depth 32 (docs/probes.md). "
          "So they are attached only while something needs them: a --vhost-user frontend, or "
          "a VM with a vhost-user device that KVM does not run (TCG); detached when nothing does. "
          "Off: those queues' kicks are the guest's count; KVM exits are counted either way.");
ABSL_FLAG(uint32_t, max_vms, VKICK_DEFAULT_MAX_VMS,
          "Size the probe maps for this many VMs (with --max-queues-per-vm and "
          "--max-vcpus-per-vm); set before the probes load. A VM that does not fit is not "
          "counted (vkick_vm_probed 0, vkick_probe_map_full_total) and is tried again when "
          "another leaves. Kernel memory grows with it: docs/probes.md.");
ABSL_FLAG(uint32_t, max_queues_per_vm, VKICK_DEFAULT_QUEUES_PER_VM,
          "Virtqueues per VM the probe maps are sized for (notify addresses, counters). A VM "
          "may use more as long as the total fits: its notify targets go in all or none.");
ABSL_FLAG(uint32_t, max_vcpus_per_vm, VKICK_DEFAULT_VCPUS_PER_VM,
          "vCPUs per VM the exit counters are sized for (8 exit reasons per vCPU).");
ABSL_FLAG(std::string, kvm_tracepoints, "auto",
          "auto | tp_btf | classic: the kvm programs' flavour. auto: BTF raw tracepoints "
          "(called directly, cheapest) where the kernel's BTF has them, else the classic "
          "tracepoints; tp_btf: fail without the BTF; classic: force the fallback.");
ABSL_FLAG(std::string, pin_dir, "/sys/fs/bpf/vkick",
          "bpffs directory where the probe maps and the kvm programs' links are pinned, so "
          "nothing is lost across a vkickd restart: the programs keep counting while vkickd is "
          "down (also after kill -9) and the next vkickd continues every VM's counters under "
          "the same vm_id. Incompatible pins (other --max-* capacities, another map layout "
          "after an upgrade) are discarded, logged, and counting starts from zero. Empty: "
          "nothing pinned, counts start at 0 at each start. Remove for good: stop vkickd, "
          "rm -r the directory (docs/operations.md).");

#ifndef VKICK_VERSION
#define VKICK_VERSION "unknown"
#endif

namespace {

// vkickd holds one fd per VM (two with an agent port): at 1000 VMs the usual
// soft limit of 1024 made VMs fail with EMFILE and /metrics stop answering
// (bench/scale). Take the hard limit, which the unit sets (LimitNOFILE).
void RaiseFdLimit() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
}

int Fail(absl::string_view msg) {
  vkick::LogToStderr(msg);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const vkick::CommandLine cl = vkick::ParseFlags(
      argc, argv,
      {.binary = "vkickd",
       .usage = "vkickd --qmp=PATH [--qmp=PATH...] [--listen=127.0.0.1:9470] [--no-probes]\n"
                "Counts virtio kicks and VM exits of QEMU VMs with eBPF and serves them on /metrics.",
       .flags_source = "controller/daemon/main.cc",
       .repeatable = {"qmp", "vhost_user"}});
  if (!cl.positional.empty()) return Fail(absl::StrCat("unexpected argument: ", cl.positional[0]));
  RaiseFdLimit();

  vkick::DaemonOptions options;
  // A QMP chardev serves one client at a time: a path given twice would
  // have its second attachment hang. Keep the first occurrence.
  for (std::string p : cl.Repeated("qmp")) {
    if (std::find(options.qmp_paths.begin(), options.qmp_paths.end(), p) ==
        options.qmp_paths.end()) {
      options.qmp_paths.push_back(std::move(p));
    } else {
      vkick::LogToStderr(absl::StrCat("--qmp=", p, " given twice; attaching once"));
    }
  }
  options.refresh_interval = absl::GetFlag(FLAGS_refresh_interval);
  options.departed_retention = absl::GetFlag(FLAGS_departed_retention);
  if (options.departed_retention < absl::ZeroDuration()) {
    return Fail("--departed-retention must not be negative");
  }
  if (const std::string dir = absl::GetFlag(FLAGS_qmp_dir); !dir.empty()) {
    auto source = vkick::OpenQmpDir(dir);
    if (!source.ok()) return Fail(absl::StrCat("--qmp-dir: ", source.status().message()));
    options.qmp_dir = *std::move(source);
  }
  const std::string listen = absl::GetFlag(FLAGS_listen);
  if (options.refresh_interval <= absl::ZeroDuration()) {
    return Fail("--refresh-interval must be positive");
  }
  if (auto addr = vkick::ParseListenAddress(listen); !addr.ok()) {
    return Fail(addr.status().message());
  }

  // The control loop's options, all checked before anything starts.
  vkick::LoopRunnerOptions loop_options;
  loop_options.interval = absl::GetFlag(FLAGS_control_interval);
  if (loop_options.interval < absl::Milliseconds(10) || loop_options.interval > absl::Seconds(60))
    return Fail("--control-interval must be 10ms..60s");
  const absl::Duration lease = absl::GetFlag(FLAGS_lease);
  if (lease < absl::Nanoseconds(vkick::proto::kMinLeaseNs) ||
      lease > absl::Nanoseconds(vkick::proto::kMaxLeaseNs) || lease <= loop_options.interval)
    return Fail("--lease must be 10ms..60s and longer than --control-interval");
  loop_options.loop.lease_ns = static_cast<uint64_t>(absl::ToInt64Nanoseconds(lease));
  auto default_policy = vkick::ParsePolicySpec(absl::GetFlag(FLAGS_default_policy));
  if (!default_policy.ok())
    return Fail(absl::StrCat("--default-policy: ", default_policy.status().message()));
  loop_options.default_policy = *default_policy;
  loop_options.state_dir = absl::GetFlag(FLAGS_state_dir);
  loop_options.state_dir_required = loop_options.state_dir != "/var/lib/vkick";
  loop_options.vhost_user_vm = absl::GetFlag(FLAGS_vhost_user_vm);
  loop_options.vhost_user_kicks_counted = absl::GetFlag(FLAGS_vhost_user_kicks);
  if (auto s = vkick::ValidatePolicyScope({loop_options.vhost_user_vm, "", -1});
      !s.ok() || loop_options.vhost_user_vm.empty())
    return Fail("--vhost-user-vm: not a valid label value");
  for (const std::string& v : cl.Repeated("vhost_user")) {
    auto d = vkick::ParseVhostUserDecl(v);
    if (!d.ok()) return Fail(d.status().message());
    for (const auto& o : loop_options.vhost_user) {
      if (o.id == d->id) return Fail(absl::StrCat("--vhost-user: ID ", d->id, " given twice"));
    }
    loop_options.vhost_user.push_back(*d);
  }
  // The probes track a frontend from its connect() to the exact path: use
  // the canonical one (a frontend connecting by a relative path or another
  // symlinked name does not match: docs/probes.md).
  options.vhost_user_vm = loop_options.vhost_user_vm;
  for (vkick::VhostUserDecl& d : loop_options.vhost_user) {
    auto canonical = vkick::CanonicalSocketPath(d.socket_path);
    if (!canonical.ok())
      return Fail(absl::StrCat("--vhost-user=", d.id, "=", d.socket_path, ": ",
                               canonical.status().message()));
    d.socket_path = *canonical;
    options.vhost_user.push_back({d.id, d.socket_path});
  }
  options.find_connected = vkick::FindConnectedFrontends;
  const std::string agent_socket = absl::GetFlag(FLAGS_agent_socket);
  if (!loop_options.vhost_user.empty() && agent_socket.empty())
    return Fail("--vhost-user needs --agent-socket (where their agent connects)");
  const std::string admin_socket = absl::GetFlag(FLAGS_admin_socket);
  const bool admin_required = admin_socket != "/run/vkick/admin.sock";
  std::optional<uint32_t> admin_gid;
  if (!absl::GetFlag(FLAGS_admin_group).empty()) {
    auto g = vkick::LookupGroup(absl::GetFlag(FLAGS_admin_group));
    if (!g.ok()) return Fail(g.status().message());
    admin_gid = *g;
  }

  const vkick::ProbeCapacity capacity{absl::GetFlag(FLAGS_max_vms),
                                      absl::GetFlag(FLAGS_max_queues_per_vm),
                                      absl::GetFlag(FLAGS_max_vcpus_per_vm)};
  if (auto s = vkick::ValidateProbeCapacity(capacity); !s.ok()) return Fail(s.message());
  const auto kvm_tracepoints = vkick::ParseKvmTracepoints(absl::GetFlag(FLAGS_kvm_tracepoints));
  if (!kvm_tracepoints.ok())
    return Fail(absl::StrCat("--kvm-tracepoints: ", kvm_tracepoints.status().message()));
  // The kick syscall programs are the daemon's to attach, when needed.
  options.kick_syscalls = absl::GetFlag(FLAGS_vhost_user_kicks);

  // Probes first: the one start-up step that needs privileges.
  std::unique_ptr<vkick::ProbeBackend> probes;
  std::string probes_described;
  if (!absl::GetFlag(FLAGS_no_probes)) {
    auto p = vkick::CreateHostProbes(capacity, *kvm_tracepoints,
                                      absl::GetFlag(FLAGS_pin_dir), &probes_described);
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

  vkick::AgentPortRegistry agent_ports;  // VMs' virtio-serial agent ports (discovery)
  vkick::Daemon daemon(options, probes.get(),
                       vkick::QmpDiscoveryFactory(absl::GetFlag(FLAGS_qmp_timeout), &agent_ports));

  vkick::LoopRunner runner(loop_options, daemon);
  if (absl::Status s = runner.Init(); !s.ok())
    return Fail(absl::StrCat("--state-dir: ", s.ToString()));

  // The agent channel: the --agent-socket listener (host-process drivers)
  // and the connections to VMs' virtio-serial agent ports.
  std::unique_ptr<vkick::AgentServer> agents;
  {
    vkick::AgentServerOptions ao;
    ao.socket_path = agent_socket;  // "" = VM channels only
    ao.vm = loop_options.vhost_user_vm;
    ao.devices = vkick::VhostUserChannelDevices(loop_options);
    // Separate caps: host connections never crowd out VM channels (one per
    // VM vkickd can attach).
    ao.max_connections = 8;
    ao.max_vm_channels =
        options.qmp_paths.size() + (options.qmp_dir ? vkick::kMaxQmpDirSockets : 0);
    ao.log = [](const std::string& s) { vkick::LogToStderr(s); };
    ao.on_hello = [&runner] { runner.Wake(); };
    ao.host_totals = [&runner](const std::set<vkick::QueueKey>& q) {
      return runner.HostTotalsNow(q);
    };
    auto a = vkick::AgentServer::Start(std::move(ao));
    if (!a.ok()) return Fail(absl::StrCat("--agent-socket: ", a.status().ToString()));
    agents = *std::move(a);
    runner.SetAgentServer(agents.get(), /*listening=*/!agent_socket.empty());
    runner.SetAgentPorts(&agent_ports);
  }

  std::unique_ptr<vkick::AdminServer> admin;
  if (!admin_socket.empty()) {
    vkick::AdminServerOptions ad;
    ad.socket_path = admin_socket;
    ad.admin_gid = admin_gid;
    ad.handler = [&runner](const vkick::AdminRequest& r, const vkick::AdminPeer& p) {
      return runner.HandleAdmin(r, p);
    };
    ad.log = [](const std::string& s) { vkick::LogToStderr(s); };
    auto a = vkick::AdminServer::Start(std::move(ad));
    if (!a.ok()) {
      if (admin_required) return Fail(absl::StrCat("--admin-socket: ", a.status().ToString()));
      vkick::LogToStderr(absl::StrCat("admin socket disabled (vkickctl will not reach this "
                                      "vkickd): ", a.status().ToString()));
    } else {
      admin = *std::move(a);
      vkick::AdminServer* raw = admin.get();
      runner.SetAdminRefusedCounter([raw] {
        return std::array<uint64_t, 3>{raw->refused(), raw->busy_refused(), raw->deadline_closed()};
      });
    }
  }

  auto collector = std::make_shared<vkick::VkickCollector>(
      [&daemon] { return daemon.Latest(); }, vkick::ExitReasonNames(), VKICK_VERSION, [&runner] { return runner.Snapshot(); });
  auto server = vkick::MetricsHttpServer::Start(listen, {collector}, [&daemon, &loop_options] {
    // Stale after three missed control steps (the loop reads the probes).
    vkick::Daemon::Health h = daemon.CheckHealth(3 * loop_options.interval + absl::Seconds(1));
    return vkick::HealthResult{h.ok, h.reason};
  });
  if (!server.ok()) return Fail(server.status().message());

  if (absl::Status s = daemon.Start(); !s.ok()) return Fail(absl::StrCat("discovery: ", s.ToString()));
  runner.Start();
  vkick::LogToStderr(absl::StrCat(
      "vkickd ", VKICK_VERSION, " listening on ", (*server)->url(), "/metrics (probes ",
      probes ? absl::StrCat("attached: ", probes_described) : "disabled by --no-probes", ", ",
      options.qmp_paths.size(),
      " QMP socket(s)", options.qmp_paths.empty() ? "" : ": ",
      absl::StrJoin(options.qmp_paths, ", "),
      options.qmp_dir ? absl::StrCat(", and every socket in ", options.qmp_dir->Describe()) : "",
      ")"));
  vkick::LogToStderr(absl::StrCat(
      "control loop every ", absl::FormatDuration(loop_options.interval), ", lease ",
      absl::FormatDuration(lease), ", default policy ",
      vkick::FormatPolicySpec(runner.Table().default_policy()), "; agent socket ",
      agent_socket.empty() ? "off" : agent_socket, " (", loop_options.vhost_user.size(),
      " --vhost-user); admin socket ", admin ? admin_socket : "off"));

  int sig = 0;
  sigwait(&stop_signals, &sig);
  vkick::LogToStderr(absl::StrCat("received ", sig == SIGINT ? "SIGINT" : "SIGTERM",
                                  ", shutting down"));
  server->reset();  // no scrape runs past this point
  admin.reset();    // no admin request runs past this point
  runner.Stop();    // the loop thread
  agents.reset();   // closes every agent connection
  daemon.Stop();    // joins attachments, untracks every VM
  probes.reset();   // detaches the BPF programs
  vkick::LogToStderr("stopped");
  return 0;
}
