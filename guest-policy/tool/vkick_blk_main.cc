// vkick-blk: a userspace virtio-blk driver whose kick path is a policy, as a
// fio-like load tool. See docs/driver.md.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include <unistd.h>

#include <cstring>
#include <optional>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/flags.h"
#include "guest-policy/tool/driver_registry.h"
#include "guest-policy/tool/workload.h"
#include "guest-policy/transport/vhost_user.h"
#include "guest-policy/transport/virtio_pci.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, socket, "", "vhost-user-blk socket (qemu-storage-daemon --export type=vhost-user-blk)");
ABSL_FLAG(std::string, pci, "", "virtio-blk PCI address bound to uio_pci_generic, e.g. 0000:00:04.0");
ABSL_FLAG(std::string, rw, "randread", "randread|randwrite|read|write|verify");
ABSL_FLAG(std::string, bs, "4k", "I/O size (bytes, or with k/m suffix), multiple of 512");
ABSL_FLAG(uint32_t, qd, 1, "queue depth per queue");
ABSL_FLAG(std::string, qd_schedule, "",
          "closed loop: depth changing over time, QD:SECONDS,... cycled (e.g. 1:5,32:5,128:5); overrides --qd");
ABSL_FLAG(double, rate, 0, "open loop: Poisson arrivals per second per queue (0 = closed loop)");
ABSL_FLAG(double, runtime, 5, "seconds of I/O (verify: only with --verify_passes=0)");
ABSL_FLAG(double, warmup, 0,
          "seconds of I/O before the measured --runtime, left out of every figure (e.g. while "
          "--policy=adaptive finds its B); not with --rw=verify");
ABSL_FLAG(uint32_t, queues, 1, "number of virtqueues (one poller thread each)");
ABSL_FLAG(uint32_t, queue_size, 256, "virtqueue size (power of two)");
ABSL_FLAG(std::string, policy, "immediate",
          "kick policy: immediate|event-idx|static:B,T|event-idx:B,T|adaptive (T in us, or ns/us/ms); "
          "event-idx:B,T closes a batch as static:B,T does, then kicks only if the device asked");
ABSL_FLAG(std::string, control, "",
          "adaptive: control block file written by vkick-agent (default /dev/shm/vkick/control-<pid>)");
ABSL_FLAG(std::string, stats_block, "default",
          "file of per-queue counters the agent reads each interval (default: stats-<pid> in the control "
          "block's directory, /dev/shm/vkick/stats-<pid>; empty: none)");
ABSL_FLAG(std::string, run_dir, "",
          "where the driver registers itself as drivers/<pid>.json (default $VKICK_RUN_DIR, else /run/vkick)");
ABSL_FLAG(std::string, serial, "",
          "device id in the registry, at most 20 of [A-Za-z0-9._:-] (default: vhost-user socket "
          "basename, other characters as '_'; pci: the device's GET_ID)");
ABSL_FLAG(std::string, completion, "poll", "poll|interrupt");
ABSL_FLAG(bool, event_idx, true, "negotiate VIRTIO_F_EVENT_IDX when offered");
ABSL_FLAG(bool, indirect, true, "negotiate VIRTIO_F_INDIRECT_DESC when offered");
ABSL_FLAG(std::string, verify_size, "64m", "verify: bytes written then read back");
ABSL_FLAG(uint64_t, verify_passes, 1,
          "verify: write + read-back passes, each with a new pattern; 0 = repeat until --runtime");
ABSL_FLAG(uint64_t, seed, 1, "seed for offsets, arrivals and verify patterns");
ABSL_FLAG(bool, json, false, "print the result as one JSON object");

namespace vkick {
namespace {

bool ParseSize(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  uint64_t mult = 1;
  std::string n = s;
  const char last = static_cast<char>(std::tolower(s.back()));
  if (last == 'k') mult = 1024;
  if (last == 'm') mult = 1024 * 1024;
  if (last == 'g') mult = 1024ull * 1024 * 1024;
  if (mult != 1) n.pop_back();
  uint64_t v;
  if (!absl::SimpleAtoi(n, &v)) return false;
  *out = v * mult;
  return true;
}

int Fail(const std::string& msg, int code = 1) {
  std::fprintf(stderr, "vkick-blk: %s\n", msg.c_str());
  return code;
}

int Main() {
  WorkloadOptions o;
  const std::string socket = absl::GetFlag(FLAGS_socket), pci = absl::GetFlag(FLAGS_pci);
  if (socket.empty() == pci.empty()) return Fail("give exactly one of --socket=PATH or --pci=ADDR (see --help)", 2);
  auto rw = ParseRwMode(absl::GetFlag(FLAGS_rw));
  if (!rw.ok()) return Fail(std::string(rw.status().message()), 2);
  o.rw = *rw;
  uint64_t bs = 0, vsize = 0;
  if (!ParseSize(absl::GetFlag(FLAGS_bs), &bs) || bs == 0 || bs % 512 != 0 || bs > (4u << 20)) {
    return Fail(absl::StrCat("--bs '", absl::GetFlag(FLAGS_bs), "': want a multiple of 512 up to 4m"), 2);
  }
  if (!ParseSize(absl::GetFlag(FLAGS_verify_size), &vsize) || vsize < bs) return Fail("bad --verify_size", 2);
  o.bs = static_cast<uint32_t>(bs);
  o.verify_bytes = vsize;
  o.verify_passes = absl::GetFlag(FLAGS_verify_passes);
  o.queue_size = static_cast<uint16_t>(absl::GetFlag(FLAGS_queue_size));
  if (!IsValidQueueSize(absl::GetFlag(FLAGS_queue_size)) || absl::GetFlag(FLAGS_queue_size) > 1024) {
    return Fail("--queue_size must be a power of two in 1..1024", 2);
  }
  o.qd = absl::GetFlag(FLAGS_qd);
  if (o.qd == 0 || o.qd > o.queue_size) return Fail(absl::StrCat("--qd must be 1..", o.queue_size), 2);
  o.rate = absl::GetFlag(FLAGS_rate);
  if (o.rate < 0) return Fail("--rate must be >= 0", 2);
  if (const std::string sched = absl::GetFlag(FLAGS_qd_schedule); !sched.empty()) {
    if (o.rate > 0) return Fail("--qd_schedule is for the closed loop: drop --rate", 2);
    std::string why;
    o.depth_schedule = DepthSchedule::Parse(sched, o.queue_size, &why);
    if (!o.depth_schedule) return Fail("bad --qd_schedule: " + why, 2);
    o.qd = o.depth_schedule->max_depth();
  }
  o.runtime_s = absl::GetFlag(FLAGS_runtime);
  if (o.runtime_s <= 0 || o.runtime_s > 3600) return Fail("--runtime must be in (0, 3600] seconds", 2);
  o.warmup_s = absl::GetFlag(FLAGS_warmup);
  if (o.warmup_s < 0 || o.warmup_s > 3600) return Fail("--warmup must be in [0, 3600] seconds", 2);
  if (o.warmup_s > 0 && absl::GetFlag(FLAGS_rw) == "verify") return Fail("--warmup is not for --rw=verify", 2);
  const uint32_t queues = absl::GetFlag(FLAGS_queues);
  if (queues == 0 || queues > 16) return Fail("--queues must be 1..16", 2);
  o.queues = static_cast<uint16_t>(queues);
  auto policy = ParseKickPolicy(absl::GetFlag(FLAGS_policy), o.queue_size);
  if (!policy.ok()) return Fail(std::string(policy.status().message()), 2);
  o.policy = *policy;
  const std::string completion = absl::GetFlag(FLAGS_completion);
  if (completion != "poll" && completion != "interrupt") return Fail("--completion must be poll or interrupt", 2);
  o.interrupts = completion == "interrupt";
  o.seed = absl::GetFlag(FLAGS_seed);

  const int pid = static_cast<int>(getpid());
  const std::string control_path =
      absl::GetFlag(FLAGS_control).empty() ? DefaultControlBlockPath(pid) : absl::GetFlag(FLAGS_control);
  const std::string run_dir = ResolveRunDir(absl::GetFlag(FLAGS_run_dir));
  const std::string serial_flag = absl::GetFlag(FLAGS_serial);
  if (!IsProtocolSerial(serial_flag)) {
    return Fail(absl::StrCat("--serial='", SanitizeSerial(serial_flag),
                             "': at most 20 characters of [A-Za-z0-9._:-] (no spaces: the agent "
                             "protocol's serial, matched against vkickd's --vhost-user IDs)"),
                2);
  }
  if (o.policy.mode == KickMode::kAdaptive) {
    // Absent now is fine: the queues run the immediate fallback and re-check
    // the path every 100 ms, so an agent started later takes over.
    o.control_path = control_path;
  }

  // The counters the agent reads each interval. Without them the driver
  // still runs; only the loop cannot observe it (unless --observe=usdt).
  std::optional<StatsFile> stats;
  if (const std::string path = absl::GetFlag(FLAGS_stats_block); !path.empty()) {
    auto sf = StatsFile::Create(path == "default" ? StatsBlockPathBeside(control_path, pid) : path, o.queues);
    if (sf.ok()) {
      stats.emplace(*std::move(sf));
      o.stats = stats->block();
    } else {
      std::fprintf(stderr, "vkick-blk: warning: no stats block: %s\n", std::string(sf.status().message()).c_str());
    }
  }

  DriverInfo info;
  info.pid = pid;
  info.stats_block = stats ? stats->path() : "";
  info.transport = socket.empty() ? "pci" : "vhost-user";
  info.socket = socket;
  info.pci = pci;
  info.queues = o.queues;
  info.queue_size = o.queue_size;
  info.control_block = control_path;
  std::optional<DriverRegistration> registration;
  o.on_ready = [&](const std::string& device_id) {
    info.serial = !serial_flag.empty() ? serial_flag
                  : !socket.empty()    ? SerialFromSocketPath(socket)
                                       : SanitizeSerial(device_id);
    auto reg = DriverRegistration::Create(run_dir, info);
    if (!reg.ok()) {
      // No registry, no agent: the driver still works (adaptive = fallback).
      std::fprintf(stderr, "vkick-blk: warning: cannot register in %s/drivers: %s\n", run_dir.c_str(),
                   std::string(reg.status().message()).c_str());
      return;
    }
    registration.emplace(*std::move(reg));
  };

  std::unique_ptr<BlkTransport> t;
  if (!socket.empty()) {
    VhostUserOptions vo;
    vo.socket_path = socket;
    vo.num_queues = o.queues;
    vo.event_idx = absl::GetFlag(FLAGS_event_idx);
    vo.indirect = absl::GetFlag(FLAGS_indirect);
    vo.interrupts = o.interrupts;
    auto d = VhostUserBlk::Connect(vo);
    if (!d.ok()) return Fail(std::string(d.status().message()));
    t = *std::move(d);
  } else {
    VirtioPciBlk::Options po;
    po.pci_address = pci;
    po.num_queues = o.queues;
    po.event_idx = absl::GetFlag(FLAGS_event_idx);
    po.indirect = absl::GetFlag(FLAGS_indirect);
    po.interrupts = o.interrupts;
    auto d = VirtioPciBlk::Open(po);
    if (!d.ok()) return Fail(std::string(d.status().message()));
    t = *std::move(d);
  }
  if ((o.rw == RwMode::kRandWrite || o.rw == RwMode::kWrite || o.rw == RwMode::kVerify) &&
      (t->features() & kVirtioBlkFRo)) {
    return Fail("device is read-only (qemu-storage-daemon: --export ...,writable=on)");
  }

  auto r = RunWorkload(*t, o);
  if (!r.ok()) return Fail(std::string(r.status().message()));
  const bool ok = !r->transport_failed && r->errors == 0 && r->lost == 0 && r->completions == r->requests;
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j;
    j["policy"] = absl::GetFlag(FLAGS_policy);
    j["rw"] = absl::GetFlag(FLAGS_rw);
    j["bs"] = o.bs;
    j["qd"] = o.qd;
    j["rate"] = o.rate;
    j["queues"] = o.queues;
    j["completion"] = completion;
    j["requests"] = r->requests;
    j["completions"] = r->completions;
    j["kicks"] = r->kicks;
    nlohmann::json why;
    for (size_t i = 0; i < r->kicks_by_why.size(); ++i) why[KickWhyName(static_cast<KickWhy>(i))] = r->kicks_by_why[i];
    j["kicks_by_why"] = why;
    j["iops"] = r->iops;
    j["lat_p50_us"] = r->lat_p50_us;
    j["lat_p99_us"] = r->lat_p99_us;
    j["lat_p999_us"] = r->lat_p999_us;
    j["kicks_per_request"] = r->kicks_per_request;
    j["asks"] = r->asks;
    j["suppressed"] = r->suppressed;
    j["cpu_us_per_request"] = r->cpu_us_per_request;
    j["errors"] = r->errors;
    j["verify_mismatches"] = r->verify_mismatches;
    j["verify_passes"] = r->verify_passes;
    j["verify_reads"] = r->verify_reads;
    j["lost"] = r->lost;
    j["transport_failed"] = r->transport_failed;
    j["elapsed_s"] = r->elapsed_s;
    j["warmup_s"] = o.warmup_s;
    j["event_idx"] = (t->features() & kVirtioFRingEventIdx) != 0;
    j["indirect"] = (t->features() & kVirtioFRingIndirectDesc) != 0;
    j["adaptive_fallbacks"] = r->adaptive_fallbacks;
    j["policy_changes"] = r->policy_changes;
    j["control_block"] = o.control_path;
    j["control_maps"] = r->control_maps;
    j["control_unmaps"] = r->control_unmaps;
    j["control_mapped"] = r->control_mapped;
    j["serial"] = info.serial;
    j["registry"] = registration ? registration->path() : "";
    if (!r->first_error.empty()) j["first_error"] = r->first_error;
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << absl::StrFormat(
        "%s %s bs=%u qd=%u queues=%u rate=%g policy=%s completion=%s\n"
        "  iops %.0f  lat p50 %.1f us  p99 %.1f us  p99.9 %.1f us\n"
        "  requests %u  kicks %u  kicks/request %.4f  cpu/request %.2f us  errors %u\n"
        "%s",
        socket.empty() ? "pci:" + pci : "vhost-user:" + socket, absl::GetFlag(FLAGS_rw), o.bs, o.qd, o.queues, o.rate,
        absl::GetFlag(FLAGS_policy), completion, r->iops, r->lat_p50_us, r->lat_p99_us, r->lat_p999_us, r->requests,
        r->kicks, r->kicks_per_request, r->cpu_us_per_request, r->errors,
        o.policy.mode == KickMode::kAdaptive
            ? absl::StrFormat("  adaptive: control %s, policy changes %u, fallbacks %u, maps %u\n", o.control_path,
                              r->policy_changes, r->adaptive_fallbacks, r->control_maps)
            : std::string());
    if (absl::GetFlag(FLAGS_rw) == "verify") {
      std::cout << absl::StrFormat("  verify: %u pass(es), %u blocks read back, %u mismatches\n", r->verify_passes,
                                   r->verify_reads, r->verify_mismatches);
    }
  }
  if (!ok) {
    return Fail(absl::StrCat("FAILED: ", r->transport_failed ? "transport failed, " : "", r->errors, " errors (", r->verify_mismatches, " verify mismatches), ", r->lost,
                             " lost, ", r->requests - std::min(r->requests, r->completions), " unaccounted",
                             r->first_error.empty() ? "" : ": " + r->first_error));
  }
  return 0;
}

}  // namespace
}  // namespace vkick

namespace {

}  // namespace

int main(int argc, char** argv) {
  const vkick::CommandLine cl = vkick::ParseFlags(
      argc, argv,
      {.binary = "vkick-blk",
       .usage =
      "userspace virtio-blk driver and load tool with a policy-driven kick path.\n"
      "  vkick-blk --socket=/tmp/vhost.sock --rw=randread --bs=4k --qd=32 --policy=static:32,50us --runtime=5\n"
      "  vkick-blk --socket=/tmp/vhost.sock --rw=verify --policy=event-idx\n"
      "Exit status: 0 ok, 1 I/O or verify failure / backend error, 2 bad flags.",
       .flags_source = "guest-policy/tool/"});
  if (!cl.positional.empty()) {
    std::fprintf(stderr, "vkick-blk: unexpected argument '%s' (see --help)\n", cl.positional[0].c_str());
    return 2;
  }
  return vkick::Main();
}
