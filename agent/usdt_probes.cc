#include "agent/usdt_probes.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "agent/bpf_read.h"
#include "vkick_agent.skel.h"

namespace vkick::agent {
namespace {

static_assert(VKICK_AGENT_DEPTH_BUCKETS == proto::kDepthBuckets);
static_assert(VKICK_AGENT_LATENCY_BUCKETS == proto::kLatencyBuckets);
static_assert(VKICK_AGENT_WHY_SLOTS == kWhySlots);
static_assert(VKICK_AGENT_WHY_TIMER == kWhyTimer);
static_assert(VKICK_AGENT_MAX_QUEUE == proto::kMaxQueuesPerDevice);
static_assert(sizeof(vkick_agent_counters) % 8 == 0);


std::string InodeKey(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return "";
  return absl::StrCat(st.st_dev, ":", st.st_ino);
}

int QuietLibbpf(enum libbpf_print_level level, const char* fmt, va_list args) {
  if (level == LIBBPF_DEBUG) return 0;
  return vfprintf(stderr, fmt, args);
}

}  // namespace

absl::StatusOr<std::unique_ptr<UsdtProbes>> UsdtProbes::Create() {
  libbpf_set_print(QuietLibbpf);
  const int ncpu = libbpf_num_possible_cpus();
  if (ncpu <= 0) return BpfErrnoStatus(-ncpu, "libbpf_num_possible_cpus");
  vkick_agent* skel = vkick_agent__open();
  if (skel == nullptr) return BpfErrnoStatus(errno, "opening the vkick_agent BPF object");
  if (int err = vkick_agent__load(skel); err != 0) {
    vkick_agent__destroy(skel);
    return BpfErrnoStatus(err, "loading the vkick_agent BPF object");
  }
  return std::unique_ptr<UsdtProbes>(new UsdtProbes(skel, ncpu));
}

UsdtProbes::~UsdtProbes() {
  for (auto& [b, links] : binary_links_)
    for (bpf_link* l : links) bpf_link__destroy(l);
  for (auto& [p, links] : pid_links_)
    for (bpf_link* l : links) bpf_link__destroy(l);
  vkick_agent__destroy(skel_);
}

absl::Status UsdtProbes::AttachAll(int pid, const std::string& binary, std::vector<bpf_link*>* links) {
  struct P {
    bpf_program* prog;
    const char* name;
  } progs[] = {{skel_->progs.vkick_submit, "submit"},
               {skel_->progs.vkick_kick, "kick"},
               {skel_->progs.vkick_complete, "complete"}};
  for (const P& p : progs) {
    bpf_link* l = bpf_program__attach_usdt(p.prog, pid, binary.c_str(), "vkick", p.name, nullptr);
    if (l == nullptr) {
      const int err = errno;
      for (bpf_link* x : *links) bpf_link__destroy(x);
      links->clear();
      return BpfErrnoStatus(err, absl::StrCat("attaching USDT vkick:", p.name, " of ", binary, " (pid ", pid, ")"));
    }
    links->push_back(l);
  }
  return absl::OkStatus();
}

absl::Status UsdtProbes::AttachBinary(const std::string& binary) {
  if (binary_links_.count(binary)) return absl::OkStatus();
  std::vector<bpf_link*> links;
  if (absl::Status s = AttachAll(-1, binary, &links); !s.ok()) return s;
  binary_links_[binary] = std::move(links);
  binary_inodes_.insert(InodeKey(binary));
  return absl::OkStatus();
}

absl::Status UsdtProbes::Track(const TrackedDriver& d) {
  const int32_t pid = d.pid;
  const std::string& binary = d.binary;
  if (pid_links_.count(pid)) return absl::OkStatus();
  if (binary_inodes_.count(InodeKey(binary))) {
    pid_links_[pid] = {};  // covered by a whole-binary attachment
    return absl::OkStatus();
  }
  std::vector<bpf_link*> links;
  if (absl::Status s = AttachAll(pid, binary, &links); !s.ok()) return s;
  pid_links_[pid] = std::move(links);
  return absl::OkStatus();
}

void UsdtProbes::Untrack(int32_t pid) {
  auto it = pid_links_.find(pid);
  if (it != pid_links_.end()) {
    for (bpf_link* l : it->second) bpf_link__destroy(l);
    pid_links_.erase(it);
  }
  const int fd = bpf_map__fd(skel_->maps.queue_stats);
  std::vector<vkick_agent_key> doomed;
  vkick_agent_key k{}, next{};
  const vkick_agent_key* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, &next) == 0) {
    if (static_cast<int32_t>(next.tgid) == pid) doomed.push_back(next);
    k = next;
    prev = &k;
  }
  for (const vkick_agent_key& d : doomed) bpf_map_delete_elem(fd, &d);
}

absl::StatusOr<CounterSnapshot> UsdtProbes::Read() {
  CounterSnapshot snap;
  // Close the max-depth interval: submits from now on start a new maximum.
  const uint32_t closed = CloseDepthEpoch(&skel_->bss->epoch);

  const int fd = bpf_map__fd(skel_->maps.queue_stats);
  int err = 0;
  const std::vector<vkick_agent_key> keys = MapKeys<vkick_agent_key>(fd, SIZE_MAX, &err);
  if (err != 0) return BpfErrnoStatus(err, "iterating queue_stats");
  std::vector<vkick_agent_counters> vals(static_cast<size_t>(num_cpus_));
  for (const vkick_agent_key& key : keys) {
    if (bpf_map_lookup_elem(fd, &key, vals.data()) != 0) continue;  // deleted meanwhile
    QueueTotals t;
    for (const vkick_agent_counters& v : vals) {
      AddCpuCounters(t, v, closed);
      t.kicks += v.kicks;
      for (size_t i = 0; i < kWhySlots; ++i) t.kicks_by_why[i] += v.kicks_by_why[i];
    }
    snap.queues[{static_cast<int32_t>(key.tgid), key.queue}] = t;
  }
  uint64_t* const outs[VKICK_AGENT_ERR_COUNT] = {&snap.map_full, &snap.bad_queue};
  SumPerCpuErrors(bpf_map__fd(skel_->maps.errors), num_cpus_, outs);
  return snap;
}

absl::StatusOr<int> UsdtProbes::TestRun(const vkick_agent_test_ctx& ctx) {
  return RunTestProgram(skel_->progs.test_probe, ctx);
}

}  // namespace vkick::agent
