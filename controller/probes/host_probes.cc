#include "controller/probes/host_probes.h"

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "host_probes.skel.h"

namespace vkick {
namespace {

// The notify map's fd as the control plane's MapOps (notify_table.h).
class BpfNotifyMap final : public MapOps<vkick_notify_key, vkick_notify_target> {
 public:
  explicit BpfNotifyMap(int fd) : fd_(fd) {}
  absl::Status Update(const vkick_notify_key& k, const vkick_notify_target& v) override {
    if (bpf_map_update_elem(fd_, &k, &v, BPF_ANY) == 0) return absl::OkStatus();
    return ProbeErrnoStatus(errno, "notify map update");
  }
  absl::Status Delete(const vkick_notify_key& k) override {
    if (bpf_map_delete_elem(fd_, &k) == 0) return absl::OkStatus();
    return ProbeErrnoStatus(errno, "notify map delete");
  }

 private:
  const int fd_;
};

// The queue_counts per-CPU array as the control plane's CounterSlotOps.
// WaitForPrograms is an update of a one-entry map-in-map of its own: the
// kernel answers it only after an RCU grace period (maybe_wait_bpf_programs
// in kernel/bpf/syscall.c: "Wait for any running non-sleepable BPF programs
// to complete so that userspace, when we return to it, knows that all
// non-sleepable programs that could be running use the new map value"),
// and the tracepoint programs run under rcu_read_lock.
class BpfCounterSlots final : public CounterSlotOps {
 public:
  static absl::StatusOr<std::unique_ptr<BpfCounterSlots>> Create(int fd, int num_cpus) {
    std::unique_ptr<BpfCounterSlots> s(new BpfCounterSlots(fd, num_cpus));
    s->inner_ = bpf_map_create(BPF_MAP_TYPE_ARRAY, "vkick_rcu_in", 4, 4, 1, nullptr);
    if (s->inner_ < 0) return ProbeErrnoStatus(errno, "creating the RCU wait map");
    LIBBPF_OPTS(bpf_map_create_opts, opts, .inner_map_fd = static_cast<__u32>(s->inner_));
    s->outer_ = bpf_map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, "vkick_rcu_wait", 4, 4, 1, &opts);
    if (s->outer_ < 0) return ProbeErrnoStatus(errno, "creating the RCU wait map");
    return s;
  }
  ~BpfCounterSlots() override {
    if (outer_ >= 0) close(outer_);
    if (inner_ >= 0) close(inner_);
  }
  absl::Status Zero(uint32_t slot) override {
    if (bpf_map_update_elem(fd_, &slot, zeros_.data(), BPF_ANY) == 0) return absl::OkStatus();
    return ProbeErrnoStatus(errno, "queue_counts update");
  }
  absl::StatusOr<uint64_t> Sum(uint32_t slot) override {
    std::vector<uint64_t> v(zeros_.size());
    if (bpf_map_lookup_elem(fd_, &slot, v.data()) != 0) {
      return ProbeErrnoStatus(errno, "queue_counts lookup");
    }
    uint64_t sum = 0;
    for (uint64_t n : v) sum += n;
    return sum;
  }
  absl::Status WaitForPrograms() override {
    const uint32_t key = 0;
    const int32_t inner = inner_;
    if (bpf_map_update_elem(outer_, &key, &inner, BPF_ANY) == 0) return absl::OkStatus();
    return ProbeErrnoStatus(errno, "waiting for running BPF programs (map-in-map update)");
  }

 private:
  BpfCounterSlots(int fd, int num_cpus) : fd_(fd), zeros_(num_cpus, 0) {}
  const int fd_;
  const std::vector<uint64_t> zeros_;  // one u64 per possible CPU
  int inner_ = -1;
  int outer_ = -1;
};

// Whether the running kernel's BTF describes raw tracepoint `tp`
// (btf_trace_<tp>), in vmlinux or, when kvm is a module, in its BTF: what
// a tp_btf program needs to load.
class KernelBtf {
 public:
  KernelBtf() : vmlinux_(btf__load_vmlinux_btf()) {
    if (vmlinux_ != nullptr) kvm_ = btf__load_module_btf("kvm", vmlinux_);
  }
  ~KernelBtf() {
    btf__free(kvm_);
    btf__free(vmlinux_);
  }
  KernelBtf(const KernelBtf&) = delete;
  KernelBtf& operator=(const KernelBtf&) = delete;

  bool HasTracepoint(absl::string_view tp) const {
    const std::string type = absl::StrCat("btf_trace_", tp);
    for (const btf* b : {vmlinux_, kvm_}) {
      if (b != nullptr && btf__find_by_name_kind(b, type.c_str(), BTF_KIND_TYPEDEF) > 0) {
        return true;
      }
    }
    return false;
  }

 private:
  btf* vmlinux_ = nullptr;
  btf* kvm_ = nullptr;  // libbpf returns null (kvm built in, or no module BTF): vmlinux only
};

}  // namespace

const char* KvmTracepointsName(KvmTracepoints k) {
  switch (k) {
    case KvmTracepoints::kAuto:
      return "auto";
    case KvmTracepoints::kBtf:
      return "tp_btf";
    case KvmTracepoints::kClassic:
      return "classic";
  }
  return "auto";
}

absl::StatusOr<KvmTracepoints> ParseKvmTracepoints(absl::string_view s) {
  for (KvmTracepoints k : {KvmTracepoints::kAuto, KvmTracepoints::kBtf, KvmTracepoints::kClassic}) {
    if (s == KvmTracepointsName(k)) return k;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("kvm tracepoints '", s, "': want auto, tp_btf or classic"));
}

absl::StatusOr<std::unique_ptr<HostProbes>> HostProbes::Create(Options options) {
  if (absl::Status s = ValidateProbeCapacity(options.capacity); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<HostProbes>> p = LoadAnyFlavour(options);
  if (p.ok() || options.pin_dir.empty() || !absl::IsDataLoss(p.status())) return p;
  // The pinned maps fit this object but contradict each other (Relearn):
  // nothing of them can be trusted, so none is reused.
  const std::string why = p.status().ToString();
  if (absl::Status s = RemovePins(PinPaths{options.pin_dir}); !s.ok()) return s;
  p = LoadAnyFlavour(options);
  if (p.ok()) {
    (*p)->pin_state_ = absl::StrCat("discarded every pin in ", options.pin_dir,
                                    " and started from zero: ", why);
  }
  return p;
}

absl::StatusOr<std::unique_ptr<HostProbes>> HostProbes::LoadAnyFlavour(const Options& options) {
  absl::StatusOr<std::unique_ptr<HostProbes>> p = Load(options, options.kvm_tracepoints);
  if (p.ok() || options.kvm_tracepoints != KvmTracepoints::kAuto) return p;
  // A kernel whose BTF has the tracepoints may still refuse the tp_btf
  // programs (their untyped-pointer read needs a recent verifier): then
  // the classic ones. Their error, if they fail too, is the one to report.
  absl::StatusOr<std::unique_ptr<HostProbes>> c = Load(options, KvmTracepoints::kClassic);
  if (c.ok()) (*c)->btf_refused_ = p.status().ToString();
  return c;
}

absl::StatusOr<std::unique_ptr<HostProbes>> HostProbes::Load(const Options& options,
                                                             KvmTracepoints kvm) {
  host_probes* skel = host_probes__open();
  if (skel == nullptr) return ProbeErrnoStatus(errno, "opening the host_probes BPF object");
  std::unique_ptr<HostProbes> probes(new HostProbes(skel));
  probes->pins_.dir = options.pin_dir;
  while (probes->pins_.dir.size() > 1 && probes->pins_.dir.back() == '/') probes->pins_.dir.pop_back();
  if (absl::Status s = probes->SizeMaps(options.capacity); !s.ok()) return s;
  if (absl::Status s = probes->ChooseKvmPrograms(kvm); !s.ok()) return s;
  if (!options.pin_dir.empty()) {
    if (absl::Status s = probes->PinMaps(); !s.ok()) return s;
  }
  int err = host_probes__load(skel);
  if (err != 0) {
    return ProbeErrnoStatus(err, absl::StrCat("loading the host_probes BPF programs, maps sized ",
                                              "for ", DescribeCapacity(options.capacity),
                                              " (see libbpf's log above)"));
  }
  const int num_cpus = libbpf_num_possible_cpus();
  if (num_cpus <= 0) return ProbeErrnoStatus(num_cpus, "counting possible CPUs");
  probes->reader_ = std::make_unique<MapReader>(num_cpus);
  probes->notify_map_ = std::make_unique<BpfNotifyMap>(bpf_map__fd(skel->maps.notify));
  absl::StatusOr<std::unique_ptr<BpfCounterSlots>> slots =
      BpfCounterSlots::Create(bpf_map__fd(skel->maps.queue_counts), num_cpus);
  if (!slots.ok()) return slots.status();
  probes->slots_ = *std::move(slots);
  probes->notify_ = std::make_unique<NotifyTargetTable>(
      probes->notify_map_.get(), bpf_map__max_entries(skel->maps.notify), probes->slots_.get(),
      bpf_map__max_entries(skel->maps.queue_counts));
  if (probes->maps_reused_) {
    if (absl::Status s = probes->Relearn(); !s.ok()) return s;
  }
  absl::Status s = probes->Attach(options);
  if (!s.ok()) return s;
  return probes;
}

// A BPF map cannot grow once loaded: every map that grows with the fleet
// gets its max_entries here, from the one formula (bpf/host_probes.h).
absl::Status HostProbes::SizeMaps(const ProbeCapacity& capacity) {
  const ProbeMapSizes z = MapSizesFor(capacity);
  const std::pair<bpf_map*, uint32_t> sizes[] = {
      {skel_->maps.tracked, z.tracked},
      {skel_->maps.notify, z.notify},
      {skel_->maps.notify_counts, z.notify_counts},
      {skel_->maps.queue_counts, z.queue_counts},
      {skel_->maps.exit_counts, z.exit_counts},
      {skel_->maps.unmatched_counts, z.unmatched_counts},
      {skel_->maps.irq_counts, z.irq_counts},
      {skel_->maps.vhost_sock, z.vhost_sock},
      {skel_->maps.kick_fds, z.kick_fds},
  };
  for (const auto& [map, n] : sizes) {
    if (int err = bpf_map__set_max_entries(map, n); err != 0) {
      return ProbeErrnoStatus(err, absl::StrCat("sizing map ", bpf_map__name(map), " to ", n));
    }
  }
  return absl::OkStatus();
}

// Each kvm tracepoint has two programs; exactly one is loaded. tp_btf is
// called directly with the arguments; the classic one first fills a perf
// trace record, which costs more on every event of every VM (RESULTS.md).
absl::Status HostProbes::ChooseKvmPrograms(KvmTracepoints mode) {
  struct Twin {
    bpf_program* btf;
    bpf_program* classic;
    const char* tracepoint;
  };
  const Twin twins[] = {
      {skel_->progs.btf_kvm_mmio, skel_->progs.tp_kvm_mmio, "kvm_mmio"},
      {skel_->progs.btf_kvm_fast_mmio, skel_->progs.tp_kvm_fast_mmio, "kvm_fast_mmio"},
      {skel_->progs.btf_kvm_pio, skel_->progs.tp_kvm_pio, "kvm_pio"},
      {skel_->progs.btf_kvm_msi_set_irq, skel_->progs.tp_kvm_msi_set_irq, "kvm_msi_set_irq"},
  };
  std::optional<KernelBtf> btf;
  if (mode != KvmTracepoints::kClassic) btf.emplace();
  for (const Twin& t : twins) {
    const bool use_btf = btf && btf->HasTracepoint(t.tracepoint);
    if (mode == KvmTracepoints::kBtf && !use_btf) {
      return absl::NotFoundError(absl::StrCat("--kvm-tracepoints=tp_btf: the kernel's BTF has no ",
                                              "btf_trace_", t.tracepoint));
    }
    bpf_program__set_autoload(use_btf ? t.classic : t.btf, false);
    kvm_progs_.push_back(use_btf ? t.btf : t.classic);
  }
  return absl::OkStatus();
}

absl::Status HostProbes::AttachOne(bpf_program* prog, std::vector<Link>* links) {
  bpf_link* link = bpf_program__attach(prog);
  if (link == nullptr) {
    return ProbeErrnoStatus(errno, absl::StrCat("attaching ", bpf_program__name(prog), " (",
                                                bpf_program__section_name(prog),
                                                "; is tracefs mounted? scripts/host-prep.sh)"));
  }
  links->push_back({link, prog});
  return absl::OkStatus();
}

absl::Status HostProbes::Attach(const Options& options) {
  // kvm_progs_: mmio, fast_mmio, pio, msi (ChooseKvmPrograms' order).
  std::vector<bpf_program*> progs;
  if (options.attach_exits) progs.push_back(skel_->progs.tp_kvm_exit);
  if (options.attach_notifications) progs.insert(progs.end(), kvm_progs_.begin(), kvm_progs_.begin() + 3);
  if (options.attach_interrupts) progs.push_back(kvm_progs_[3]);
  if (!pins_.dir.empty()) {
    // Before attaching: a link of the other flavour still attached beside
    // its new twin would count every event twice.
    std::set<std::string> names;
    for (bpf_program* prog : progs) names.insert(bpf_program__name(prog));
    if (absl::Status s = UnpinStrayLinks(names); !s.ok()) return s;
  }
  for (bpf_program* prog : progs) {
    absl::Status s = pins_.dir.empty() ? AttachOne(prog, &links_) : AttachPinned(prog);
    if (!s.ok()) return s;
  }
  return options.attach_vhost_user ? SetKickSyscalls(true) : absl::OkStatus();
}

absl::Status HostProbes::SetKickSyscalls(bool attached) {
  if (!attached) {
    for (const Link& l : syscall_links_) bpf_link__destroy(l.link);
    syscall_links_.clear();
    return absl::OkStatus();
  }
  if (!syscall_links_.empty()) return absl::OkStatus();
  for (bpf_program* prog : {skel_->progs.tp_sys_enter_sendmsg, skel_->progs.tp_sys_enter_write,
                            skel_->progs.tp_sys_enter_connect, skel_->progs.tp_sched_process_exit}) {
    if (absl::Status s = AttachOne(prog, &syscall_links_); !s.ok()) {
      SetKickSyscalls(false).IgnoreError();  // all or none
      return s;
    }
  }
  return absl::OkStatus();
}

// The maps every program shares (not .rodata/.bss: per object, the
// programs' own), each at <dir>/maps/<name>; libbpf reuses a pinned one at
// the load and pins the ones it creates. All or none: a map that does not
// fit (capacity flags, a struct changed by an upgrade), or a partial set,
// discards every pin, so no VM is half re-learned.
absl::Status HostProbes::PinMaps() {
  if (absl::Status s = MakePinDirs(pins_); !s.ok()) return s;
  const btf* obj_btf = bpf_object__btf(skel_->obj);
  std::vector<bpf_map*> maps;
  std::string why;
  size_t pinned = 0;
  bpf_map* map;
  bpf_object__for_each_map(map, skel_->obj) {
    if (bpf_map__is_internal(map)) continue;
    maps.push_back(map);
    absl::StatusOr<std::string> m = PinnedMapMismatch(map, obj_btf, pins_.map(bpf_map__name(map)));
    if (absl::IsNotFound(m.status())) continue;
    if (!m.ok()) return m.status();
    ++pinned;
    if (why.empty()) why = *m;
  }
  if (pinned > 0 && pinned < maps.size() && why.empty()) {
    why = absl::StrCat("only ", pinned, " of the ", maps.size(), " maps are pinned");
  }
  if (!why.empty()) {
    if (absl::Status s = RemovePins(pins_); !s.ok()) return s;
    pin_state_ = absl::StrCat("discarded every pin in ", pins_.dir,
                              " (its counts are lost) and started from zero: ", why);
  } else if (pinned == 0) {
    pin_state_ = absl::StrCat("pinned new maps in ", pins_.dir);
  } else {
    maps_reused_ = true;
    pin_state_ = absl::StrCat("reused the pinned maps in ", pins_.dir);
  }
  for (bpf_map* m : maps) {
    if (int err = bpf_map__set_pin_path(m, pins_.map(bpf_map__name(m)).c_str()); err != 0) {
      return ProbeErrnoStatus(err, absl::StrCat("setting the pin path of map ", bpf_map__name(m)));
    }
  }
  return absl::OkStatus();
}

std::set<uint32_t> HostProbes::MapIds() const {
  std::set<uint32_t> ids;
  bpf_map* map;
  bpf_object__for_each_map(map, skel_->obj) {
    if (absl::StatusOr<uint32_t> id = MapIdOf(bpf_map__fd(map)); id.ok()) ids.insert(*id);
  }
  return ids;
}

// A pinned link whose program is this code over these maps is kept: it
// has counted all along, and attaching a second copy would count every
// event twice. Any other (other code after an upgrade, or maps started
// afresh) is detached first and the new one attached after, so in the
// microseconds between, events of that tracepoint are lost, never counted
// twice: the counters stay a lower bound.
absl::Status HostProbes::AttachPinned(bpf_program* prog) {
  const std::string path = pins_.link(bpf_program__name(prog));
  bpf_link* old = access(path.c_str(), F_OK) == 0 ? bpf_link__open(path.c_str()) : nullptr;
  if (old != nullptr) {
    absl::StatusOr<std::string> why =
        maps_reused_ ? PinnedLinkMismatch(bpf_link__fd(old), bpf_program__fd(prog), MapIds())
                     : std::string("the maps were not reused");
    if (why.ok() && why->empty()) {
      links_.push_back({old, prog});
      return absl::OkStatus();
    }
    bpf_link__unpin(old);
    bpf_link__destroy(old);  // our fd was its last holder: detached
    absl::StrAppend(&pin_state_, "; replaced pinned link ", bpf_program__name(prog), ": ",
                    why.ok() ? *why : why.status().ToString());
  } else {
    unlink(path.c_str());  // none, or not a link: a stranger's pin in our directory
  }
  if (absl::Status s = AttachOne(prog, &links_); !s.ok()) return s;
  if (int err = bpf_link__pin(links_.back().link, path.c_str()); err != 0) {
    return ProbeErrnoStatus(err, absl::StrCat("pinning the link of ", bpf_program__name(prog),
                                              " at ", path));
  }
  return absl::OkStatus();
}

// Links pinned for programs this object does not attach (the other kvm
// flavour, a group switched off, an older version's program): unpinned,
// which detaches them (no one else holds them).
absl::Status HostProbes::UnpinStrayLinks(const std::set<std::string>& wanted) {
  DIR* d = opendir(pins_.links().c_str());
  if (d == nullptr) return ProbeErrnoStatus(errno, absl::StrCat("listing ", pins_.links()));
  std::vector<std::string> stray;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.' && !wanted.contains(e->d_name)) stray.push_back(e->d_name);
  }
  closedir(d);
  for (const std::string& name : stray) {
    if (unlink(pins_.link(name.c_str()).c_str()) != 0 && errno != ENOENT) {
      return ProbeErrnoStatus(errno, absl::StrCat("unpinning stray link ", name));
    }
    absl::StrAppend(&pin_state_, "; detached pinned link ", name, " (not attached any more)");
  }
  return absl::OkStatus();
}

// Rebuilds from the reused maps what only the previous vkickd's memory
// held: the notify table (vm_ids, counter slots) and the VM processes to
// adopt. Processes gone meanwhile are dropped now, counts and all.
absl::Status HostProbes::Relearn() {
  const int nfd = bpf_map__fd(skel_->maps.notify);
  std::vector<NotifyTargetTable::Entry> entries;
  absl::Status s = ForEachKey<vkick_notify_key>(nfd, "notify", [&](const vkick_notify_key& k) {
    NotifyTargetTable::Entry e{k, {}};
    if (bpf_map_lookup_elem(nfd, &k, &e.target) == 0) entries.push_back(e);
  });
  if (!s.ok()) return s;
  if (s = notify_->Adopt(entries); !s.ok()) return s;
  const int tfd = bpf_map__fd(skel_->maps.tracked);
  std::map<uint32_t, uint32_t> tracked;
  s = ForEachKey<uint32_t>(tfd, "tracked", [&](uint32_t tgid) {
    if (uint32_t vm = 0; bpf_map_lookup_elem(tfd, &tgid, &vm) == 0) tracked[tgid] = vm;
  });
  if (!s.ok()) return s;
  std::set<uint32_t> frontends, frontend_vms;
  const int ffd = bpf_map__fd(skel_->maps.frontends);
  s = ForEachKey<uint32_t>(ffd, "frontends", [&](uint32_t tgid) {
    frontends.insert(tgid);
    if (vkick_frontend_value v{}; bpf_map_lookup_elem(ffd, &tgid, &v) == 0) {
      frontend_vms.insert(v.vm_id);
    }
  });
  const int pfd = bpf_map__fd(skel_->maps.vhost_paths);
  s.Update(ForEachKey<vkick_path_key>(pfd, "vhost_paths", [&](const vkick_path_key& k) {
    if (vkick_frontend_value v{}; bpf_map_lookup_elem(pfd, &k, &v) == 0) {
      frontend_vms.insert(v.vm_id);
    }
  }));
  if (!s.ok()) return s;
  uint32_t max_id = 0;
  AdoptedVms adopted;
  for (const auto& [tgid, vm] : tracked) {
    max_id = std::max(max_id, vm);
    if (!frontends.contains(tgid)) adopted.vm_of_pid[tgid] = vm;
  }
  for (const auto& [tgid, vm] : notify_->processes()) {
    max_id = std::max(max_id, vm);
    auto it = adopted.vm_of_pid.emplace(tgid, vm).first;
    if (it->second != vm) {
      return absl::DataLossError(absl::StrCat("pid ", tgid, " is tracked as vm_id ", it->second,
                                              " but has notify keys of vm_id ", vm));
    }
  }
  for (uint32_t vm : frontend_vms) max_id = std::max(max_id, vm);
  if (s = ForgetFrontends(frontends, frontend_vms); !s.ok()) return s;
  std::map<uint32_t, uint32_t> gone;
  for (auto it = adopted.vm_of_pid.begin(); it != adopted.vm_of_pid.end();) {
    if (kill(static_cast<pid_t>(it->first), 0) == 0 || errno != ESRCH) {
      ++it;
      continue;
    }
    gone.insert(*it);
    it = adopted.vm_of_pid.erase(it);
  }
  if (s = UntrackProcesses(gone); !s.ok()) return s;
  adopted.next_vm_id = max_id + 1;
  adopted_ = std::move(adopted);
  absl::StrAppend(&pin_state_, ": ", adopted_.vm_of_pid.size(), " VM processes to adopt, ", gone.size(),
                  " gone since (dropped)", frontends.empty() ? "" : ", frontends forgotten");
  return absl::OkStatus();
}

absl::Status HostProbes::ForgetFrontends(const std::set<uint32_t>& tgids,
                                         const std::set<uint32_t>& vms) {
  absl::Status status;
  const int tfd = bpf_map__fd(skel_->maps.tracked);
  const int ffd = bpf_map__fd(skel_->maps.frontends);
  for (uint32_t tgid : tgids) {
    bpf_map_delete_elem(tfd, &tgid);
    bpf_map_delete_elem(ffd, &tgid);
  }
  const int pfd = bpf_map__fd(skel_->maps.vhost_paths);
  status.Update(ForEachKey<vkick_path_key>(pfd, "vhost_paths", [&](const vkick_path_key& k) {
    bpf_map_delete_elem(pfd, &k);
  }));
  DropVmCounters(vms, &status);
  DropSockets(tgids, &status);
  return status;
}

std::string HostProbes::kvm_flavour() const {
  size_t btf = 0;
  for (bpf_program* prog : kvm_progs_) {
    btf += absl::StartsWith(bpf_program__section_name(prog), "tp_btf/") ? 1 : 0;
  }
  std::string f = btf == kvm_progs_.size() ? "tp_btf" : btf == 0 ? "classic" : "tp_btf+classic";
  return btf_refused_.empty() ? f : absl::StrCat(f, " (the kernel refused tp_btf: ", btf_refused_, ")");
}

std::vector<std::string> HostProbes::attached_programs() const {
  std::vector<std::string> names;
  for (const auto* links : {&links_, &syscall_links_}) {
    for (const Link& l : *links) names.push_back(bpf_program__name(l.prog));
  }
  return names;
}

HostProbes::~HostProbes() {
  for (const Link& l : links_) {
    if (!pins_.dir.empty()) {
      // Pinned: it stays attached. Only our fd goes: libbpf's detach of a
      // perf link (classic tracepoint) would also disable its perf event,
      // which the pinned link keeps. (That event's own fd stays open in
      // this process, inert once the link is gone: one per classic link.)
      bpf_link__disconnect(l.link);
      close(bpf_link__fd(l.link));
    }
    bpf_link__destroy(l.link);
  }
  for (const Link& l : syscall_links_) bpf_link__destroy(l.link);
  host_probes__destroy(skel_);
}

absl::Status HostProbes::InsertTracked(uint32_t tgid, uint32_t vm_id) {
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.tracked), &tgid, &vm_id, BPF_ANY) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("tracking pid ", tgid, " (at most ",
                                                bpf_map__max_entries(skel_->maps.tracked),
                                                " processes: --max-vms)"));
  }
  return absl::OkStatus();
}

// vkickd is the bitmap's only writer (one thread): a word is read, changed
// and written back without a race.
absl::Status HostProbes::SetVmmBit(uint32_t tgid, bool on) {
  if (tgid >= VKICK_TGID_BITS) return absl::OkStatus();  // beyond it: always the hash path
  const int fd = bpf_map__fd(skel_->maps.vmm_tgids);
  const uint32_t word = tgid / 64;
  uint64_t bits = 0;
  if (bpf_map_lookup_elem(fd, &word, &bits) != 0) {
    return ProbeErrnoStatus(errno, "vmm_tgids lookup");
  }
  const uint64_t mask = uint64_t{1} << (tgid % 64);
  bits = on ? bits | mask : bits & ~mask;
  if (bpf_map_update_elem(fd, &word, &bits, BPF_ANY) != 0) {
    return ProbeErrnoStatus(errno, "vmm_tgids update");
  }
  return absl::OkStatus();
}

// All or nothing: tracked, the VM's notify keys for the process, its bit.
absl::Status HostProbes::TrackProcess(uint32_t tgid, uint32_t vm_id) {
  if (absl::Status s = InsertTracked(tgid, vm_id); !s.ok()) return s;
  absl::Status s = notify_->Track(tgid, vm_id);
  if (s.ok()) s = SetVmmBit(tgid, true);
  if (!s.ok()) {
    SetVmmBit(tgid, false).IgnoreError();
    notify_->Untrack(tgid).IgnoreError();
    bpf_map_delete_elem(bpf_map__fd(skel_->maps.tracked), &tgid);
  }
  return s;
}

absl::Status HostProbes::UntrackProcess(uint32_t tgid, uint32_t vm_id) {
  return UntrackProcesses({{tgid, vm_id}});
}

absl::Status HostProbes::UntrackProcesses(const std::map<uint32_t, uint32_t>& vm_of_tgid) {
  if (vm_of_tgid.empty()) return absl::OkStatus();
  absl::Status status;
  std::set<uint32_t> tgids, vm_ids;
  for (const auto& [tgid, vm_id] : vm_of_tgid) {
    // Stop counting first, then drop what was counted.
    if (absl::Status s = SetVmmBit(tgid, false); !s.ok()) return s;
    int fd = bpf_map__fd(skel_->maps.tracked);
    if (bpf_map_delete_elem(fd, &tgid) != 0 && errno != ENOENT) {
      return ProbeErrnoStatus(errno, absl::StrCat("untracking pid ", tgid));
    }
    status.Update(notify_->Untrack(tgid));
    status.Update(notify_->Drop(vm_id));  // its own keys and slots, known: no walk
    if (bpf_map_delete_elem(bpf_map__fd(skel_->maps.frontends), &tgid) != 0 && errno != ENOENT) {
      status.Update(ProbeErrnoStatus(errno, absl::StrCat("dropping frontend pid ", tgid)));
    }
    tgids.insert(tgid);
    vm_ids.insert(vm_id);
  }
  DropVmCounters(vm_ids, &status);
  DropSockets(tgids, &status);
  return status;
}

void HostProbes::DropVmCounters(const std::set<uint32_t>& vm_ids, absl::Status* status) {
  if (vm_ids.empty()) return;
  auto drop = [&](auto key_type, bpf_map* map) {
    using Key = decltype(key_type);
    const int mfd = bpf_map__fd(map);
    status->Update(ForEachKey<Key>(mfd, bpf_map__name(map), [&](const Key& k) {
      if (vm_ids.contains(k.vm_id)) bpf_map_delete_elem(mfd, &k);
    }));
  };
  drop(vkick_exit_key{}, skel_->maps.exit_counts);
  drop(vkick_queue_key{}, skel_->maps.notify_counts);
  drop(vkick_unmatched_key{}, skel_->maps.unmatched_counts);
  drop(vkick_irq_key{}, skel_->maps.irq_counts);
}

void HostProbes::DropSockets(const std::set<uint32_t>& tgids, absl::Status* status) {
  if (tgids.empty()) return;
  for (bpf_map* map : {skel_->maps.kick_fds, skel_->maps.vhost_sock}) {
    const int mfd = bpf_map__fd(map);
    status->Update(ForEachKey<vkick_sock_key>(mfd, bpf_map__name(map), [&](const vkick_sock_key& k) {
      if (tgids.contains(k.tgid)) bpf_map_delete_elem(mfd, &k);
    }));
  }
}

absl::Status HostProbes::SetNotifyTargets(uint32_t vm_id, absl::Span<const NotifyTarget> targets) {
  return notify_->Set(vm_id, targets);
}

absl::Status HostProbes::SetVhostUserSocket(uint32_t tgid, int32_t socket_fd,
                                            uint16_t device_id) {
  vkick_sock_key key{tgid, socket_fd};
  vkick_sock_value value{};
  value.device_id = device_id;
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.vhost_sock), &key, &value, BPF_ANY) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("declaring vhost-user socket fd ", socket_fd,
                                                " of pid ", tgid));
  }
  // Kick fds announced over this socket before it was declared: label them
  // now, so the order of discovery and SET_VRING_KICK does not matter.
  int kfd = bpf_map__fd(skel_->maps.kick_fds);
  return ForEachKey<vkick_sock_key>(kfd, "kick_fds", [&](const vkick_sock_key& k) {
    vkick_kick_value v{};
    if (k.tgid != tgid || bpf_map_lookup_elem(kfd, &k, &v) != 0) return;
    if (v.socket_fd == socket_fd && v.device_id != device_id) {
      v.device_id = device_id;
      bpf_map_update_elem(kfd, &k, &v, BPF_EXIST);
    }
  });
}

absl::Status HostProbes::SetVhostUserPath(absl::string_view path, uint32_t vm_id,
                                          uint16_t device_id) {
  if (path.empty() || path[0] != '/' || path.size() >= VKICK_SUN_PATH_MAX ||
      path.find('\0') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("vhost-user socket path '", path, "': want an absolute path of at most ",
                     VKICK_SUN_PATH_MAX - 1, " bytes"));
  }
  vkick_path_key key{};  // zero-padded: compares by value with the program's key
  std::memcpy(key.path, path.data(), path.size());
  vkick_frontend_value value{};
  value.vm_id = vm_id;
  value.device_id = device_id;
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.vhost_paths), &key, &value, BPF_ANY) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("declaring vhost-user socket path ", path,
                                                " (at most ", VKICK_MAX_VHOST_PATHS, " paths)"));
  }
  return absl::OkStatus();
}

absl::Status HostProbes::TrackFrontend(uint32_t tgid, int32_t socket_fd, uint32_t vm_id,
                                       uint16_t device_id) {
  uint32_t cur = 0;
  if (bpf_map_lookup_elem(bpf_map__fd(skel_->maps.tracked), &tgid, &cur) == 0 && cur != vm_id) {
    // Like the connect program: a process tracked as a VM (QEMU) keeps it.
    return absl::FailedPreconditionError(
        absl::StrCat("pid ", tgid, " is already tracked as vm_id ", cur));
  }
  vkick_frontend_value value{};
  value.vm_id = vm_id;
  value.device_id = device_id;
  // Marked as a frontend first, so the exit program drops it once tracked.
  if (bpf_map_update_elem(bpf_map__fd(skel_->maps.frontends), &tgid, &value, BPF_ANY) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("adopting frontend pid ", tgid, " (at most ",
                                                VKICK_MAX_FRONTENDS, ")"));
  }
  // Tracked, not as a VMM: a frontend makes no guest writes to match.
  if (absl::Status s = InsertTracked(tgid, vm_id); !s.ok()) return s;
  return SetVhostUserSocket(tgid, socket_fd, device_id);
}

absl::Status HostProbes::SweepExitedFrontends() {
  absl::Status status;
  const int tracked_fd = bpf_map__fd(skel_->maps.tracked);
  // Frontends whose process is gone without the exit program having seen it
  // (not attached, or adopted after it exited): untrack them.
  const int ffd = bpf_map__fd(skel_->maps.frontends);
  status.Update(ForEachKey<uint32_t>(ffd, "frontends", [&](const uint32_t& tgid) {
    if (kill(static_cast<pid_t>(tgid), 0) == 0 || errno != ESRCH) return;
    vkick_frontend_value fv{};
    uint32_t vm = 0;
    if (bpf_map_lookup_elem(ffd, &tgid, &fv) == 0 &&
        bpf_map_lookup_elem(tracked_fd, &tgid, &vm) == 0 && vm == fv.vm_id) {
      bpf_map_delete_elem(tracked_fd, &tgid);
    }
    bpf_map_delete_elem(ffd, &tgid);
  }));
  // Bindings of processes no longer tracked.
  auto untracked = [&](uint32_t tgid) {
    uint32_t vm = 0;
    return bpf_map_lookup_elem(tracked_fd, &tgid, &vm) != 0;
  };
  for (bpf_map* map : {skel_->maps.kick_fds, skel_->maps.vhost_sock}) {
    const int mfd = bpf_map__fd(map);
    status.Update(ForEachKey<vkick_sock_key>(mfd, bpf_map__name(map), [&](const vkick_sock_key& k) {
      if (untracked(k.tgid)) bpf_map_delete_elem(mfd, &k);
    }));
  }
  return status;
}

absl::StatusOr<CounterSnapshot> HostProbes::ReadCounters() {
  CounterSnapshot snap;
  absl::Status status;
  auto read = [&](bpf_map* map, auto key, auto value, auto values, auto add) {
    using Key = decltype(key);
    using Value = decltype(value);
    status.Update(reader_->ForEach<Key, Value>(bpf_map__fd(map), bpf_map__name(map), values, add));
  };
  read(skel_->maps.exit_counts, vkick_exit_key{}, uint64_t{}, kPerCpuSum,
       [&](const vkick_exit_key& k, uint64_t n) {
         snap.exits.push_back({k.vm_id, k.vcpu_id, k.isa, k.reason, n});
       });
  // A queue's count: its slot, what a slot of it counted before it was
  // given back, and the hash (kicks by write(), legacy values without a
  // slot). One entry per queue; a slot that counted nothing adds none (a
  // legacy-only device's speculative slots), as a hash key exists only once
  // counted.
  std::map<ProbeQueueId, uint64_t> notifications;
  read(skel_->maps.notify_counts, vkick_queue_key{}, uint64_t{}, kPerCpuSum,
       [&](const vkick_queue_key& k, uint64_t n) {
         notifications[{k.vm_id, k.device_id, k.queue}] += n;
       });
  status.Update(reader_->ForEachIndex<uint64_t>(
      bpf_map__fd(skel_->maps.queue_counts), "queue_counts", notify_->slot_bound(), kPerCpuSum,
      [&](uint32_t slot, uint64_t n) {
        std::optional<ProbeQueueId> q = notify_->SlotOwner(slot);
        if (q && n != 0) notifications[*q] += n;
      }));
  notify_->ForEachCarried([&](const ProbeQueueId& q, uint64_t n) {
    if (n != 0) notifications[q] += n;
  });
  for (const auto& [q, n] : notifications) {
    snap.notifications.push_back({std::get<0>(q), std::get<1>(q), std::get<2>(q), n});
  }
  read(skel_->maps.unmatched_counts, vkick_unmatched_key{}, uint64_t{}, kPerCpuSum,
       [&](const vkick_unmatched_key& k, uint64_t n) {
         snap.unmatched_writes.push_back({k.vm_id, static_cast<NotifyTarget::Space>(k.space), n});
       });
  read(skel_->maps.irq_counts, vkick_irq_key{}, uint64_t{}, kPerCpuSum,
       [&](const vkick_irq_key& k, uint64_t n) {
         snap.interrupts.push_back({k.vm_id, k.address, k.data, n});
       });
  read(skel_->maps.kick_fds, vkick_sock_key{}, vkick_kick_value{}, kPlainValues,
       [&](const vkick_sock_key& k, const vkick_kick_value& v) {
         snap.kick_fds.push_back({k.tgid, k.fd, v.socket_fd, v.device_id, v.queue});
       });
  read(skel_->maps.frontends, uint32_t{}, vkick_frontend_value{}, kPlainValues,
       [&](uint32_t tgid, const vkick_frontend_value& v) {
         snap.frontends.push_back({tgid, v.vm_id, v.device_id});
       });
  status.Update(ReadErrors(&snap.errors));
  if (!status.ok()) return status;
  return snap;
}

absl::Status HostProbes::ReadErrors(ProbeErrors* errors) {
  const int fd = bpf_map__fd(skel_->maps.errors);
  uint64_t sums[VKICK_ERR_COUNT] = {};
  for (uint32_t i = 0; i < VKICK_ERR_COUNT; ++i) {
    if (!reader_->Lookup(fd, &i, kPerCpuSum, &sums[i])) {
      return ProbeErrnoStatus(errno, "reading the errors map");
    }
  }
  errors->map_full = sums[VKICK_ERR_MAP_FULL];
  errors->read_user_failed = sums[VKICK_ERR_READ_USER];
  errors->bad_vhost_msg = sums[VKICK_ERR_BAD_VHOST_MSG];
  errors->bad_queue = sums[VKICK_ERR_BAD_QUEUE];
  return absl::OkStatus();
}

absl::StatusOr<std::map<ProbeQueueId, uint64_t>> HostProbes::ReadNotificationTotals(
    absl::Span<const ProbeQueueId> queues) {
  const int fd = bpf_map__fd(skel_->maps.notify_counts);
  const int slots_fd = bpf_map__fd(skel_->maps.queue_counts);
  std::map<ProbeQueueId, uint64_t> out;
  for (const ProbeQueueId& q : queues) {
    vkick_queue_key k{};  // no padding today; zeroed so a future hole compares equal
    std::tie(k.vm_id, k.device_id, k.queue) = q;
    uint64_t n = 0;
    if (!reader_->Lookup(fd, &k, kPerCpuSum, &n) && errno != ENOENT) {
      return ProbeErrnoStatus(errno, "reading notify_counts");
    }
    uint64_t in_slot = 0;
    if (std::optional<uint32_t> slot = notify_->SlotOf(q);
        slot && !reader_->Lookup(slots_fd, &*slot, kPerCpuSum, &in_slot)) {
      return ProbeErrnoStatus(errno, "reading queue_counts");
    }
    out[q] = n + in_slot + notify_->Carried(q);  // absent: nothing counted yet
  }
  return out;
}

absl::Status HostProbes::TestRun(int prog_fd, const void* ctx, size_t size,
                                 absl::string_view what) {
  LIBBPF_OPTS(bpf_test_run_opts, opts, .ctx_in = ctx, .ctx_size_in = static_cast<__u32>(size));
  if (bpf_prog_test_run_opts(prog_fd, &opts) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("BPF_PROG_TEST_RUN of ", what));
  }
  if (opts.retval != 0) {
    return absl::InternalError(absl::StrCat(what, " returned ", opts.retval));
  }
  return absl::OkStatus();
}

absl::Status HostProbes::TestRunExit(const vkick_test_exit_ctx& ctx) {
  return TestRun(bpf_program__fd(skel_->progs.test_exit), &ctx, sizeof(ctx), "test_exit");
}
absl::Status HostProbes::TestRunIo(const vkick_test_io_ctx& ctx) {
  return TestRun(bpf_program__fd(skel_->progs.test_io), &ctx, sizeof(ctx), "test_io");
}
absl::Status HostProbes::TestRunMsi(const vkick_test_msi_ctx& ctx) {
  return TestRun(bpf_program__fd(skel_->progs.test_msi), &ctx, sizeof(ctx), "test_msi");
}

int HostProbes::MapFdForTest(absl::string_view name) const {
  bpf_map* map = bpf_object__find_map_by_name(skel_->obj, std::string(name).c_str());
  return map ? bpf_map__fd(map) : -1;
}

}  // namespace vkick
