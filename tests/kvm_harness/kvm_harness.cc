// vkick-kvm-harness: one VM through the raw KVM API, one vCPU running a tiny
// real-mode guest that does N 16-bit MMIO writes to address A, then M 16-bit
// OUTs of value V to port P, then HLT; --repeat R runs it R times.
//
// A and P get ioeventfds registered the way QEMU's virtio-pci does: modern
// notify MMIO with len 0 and no datamatch (KVM's "fast MMIO" form), legacy
// notify PIO with len 2 and datamatch = queue index. Whether KVM absorbs the
// writes in the kernel (ioeventfd signalled, no userspace exit) or exits to
// us (KVM_EXIT_MMIO / KVM_EXIT_IO) is measured and printed, with the elapsed
// time, as one JSON object. It is the fixture of the exact-count probe tests
// and the load of bench/probe_cost.
//
// With --attach-probes=tracked the harness loads vkick's host probes itself,
// tracks its own pid with A and P as notify targets and reports what the
// probes counted ("probe_counts"); =untracked attaches them without tracking
// (the cost every other process on the host pays).
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/errno_status.h"
#include "common/flags.h"
#include "controller/probes/host_probes.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(uint32_t, mmio_writes, 1000, "MMIO writes to --mmio-addr per run of the guest");
ABSL_FLAG(uint32_t, pio_writes, 1000, "16-bit OUTs to --pio-port per run of the guest");
ABSL_FLAG(uint32_t, pio_value, 0, "Value written by the OUTs (legacy virtio: the queue index)");
ABSL_FLAG(uint32_t, mmio_value, 0, "Value written by the MMIO writes");
ABSL_FLAG(uint32_t, repeat, 1, "Run the guest this many times (HLT, reset RIP, run again)");
ABSL_FLAG(uint32_t, mmio_addr, 0xd0000,
          "Guest-physical MMIO address, in [0x10000, 0xffff0] (real mode reaches 1 MiB; RAM "
          "is the first 64 KiB)");
ABSL_FLAG(uint32_t, pio_port, 0xc050, "I/O port of the OUTs");
ABSL_FLAG(bool, ioeventfd, true, "Register ioeventfds for --mmio-addr and --pio-port");
ABSL_FLAG(int64_t, pio_datamatch, -1,
          "Datamatch of the PIO ioeventfd (default: --pio-value, as QEMU does per queue)");
ABSL_FLAG(std::string, attach_probes, "none",
          "none | tracked | untracked: load vkick's host probes in this process and track "
          "(or not) this process, with --mmio-addr and --pio-port as notify targets");
ABSL_FLAG(bool, probe_vhost_user, true,
          "With --attach-probes: also attach the vhost-user programs (syscalls:sys_enter_sendmsg, "
          "sys_enter_write), which put every task's syscalls on the tracepoint path");
ABSL_FLAG(uint32_t, max_vms, VKICK_DEFAULT_MAX_VMS,
          "With --attach-probes: the maps' capacity in VMs (vkickd's --max-vms)");
ABSL_FLAG(std::string, kvm_tracepoints, "auto",
          "With --attach-probes: auto | tp_btf | classic, the kvm programs' flavour "
          "(vkickd's --kvm-tracepoints)");

namespace vkick {
namespace {

constexpr uint64_t kRamSize = 0x10000;  // 64 KiB at gpa 0
constexpr uint64_t kCodeAddr = 0x1000;

absl::Status Errno(absl::string_view what) { return ErrnoStatus(errno, what); }

int64_t ThreadCpuNs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// The guest, 16-bit real mode, loaded at 0x1000 (CS = 0). Immediates are
// patched in by Assemble(). ECX (0x66 prefix) so counts may exceed 65535.
std::vector<uint8_t> Assemble(uint32_t mmio_addr, uint16_t mmio_value, uint32_t n,
                              uint16_t port, uint16_t pio_value, uint32_t m) {
  const uint16_t seg = mmio_addr >> 4, off = mmio_addr & 0xf;
  auto le16 = [](uint16_t v) { return std::vector<uint8_t>{uint8_t(v), uint8_t(v >> 8)}; };
  auto le32 = [](uint32_t v) {
    return std::vector<uint8_t>{uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
  };
  std::vector<uint8_t> c;
  auto emit = [&c](std::initializer_list<uint8_t> b) { c.insert(c.end(), b); };
  auto emitv = [&c](const std::vector<uint8_t>& b) { c.insert(c.end(), b.begin(), b.end()); };
  emit({0xb8}); emitv(le16(seg));          //  0: mov ax, seg
  emit({0x8e, 0xd8});                      //  3: mov ds, ax
  emit({0xb8}); emitv(le16(mmio_value));   //  5: mov ax, mmio_value
  emit({0x66, 0xb9}); emitv(le32(n));      //  8: mov ecx, N
  emit({0x66, 0x85, 0xc9});                // 14: test ecx, ecx
  emit({0x74, 0x07});                      // 17: jz 26
  emit({0xa3}); emitv(le16(off));          // 19: mov [off], ax   <- the MMIO write
  emit({0x66, 0x49});                      // 22: dec ecx
  emit({0x75, 0xf9});                      // 24: jnz 19
  emit({0xba}); emitv(le16(port));         // 26: mov dx, port
  emit({0xb8}); emitv(le16(pio_value));    // 29: mov ax, pio_value
  emit({0x66, 0xb9}); emitv(le32(m));      // 32: mov ecx, M
  emit({0x66, 0x85, 0xc9});                // 38: test ecx, ecx
  emit({0x74, 0x05});                      // 41: jz 48
  emit({0xef});                            // 43: out dx, ax      <- the PIO write
  emit({0x66, 0x49});                      // 44: dec ecx
  emit({0x75, 0xfb});                      // 46: jnz 43
  emit({0xf4});                            // 48: hlt
  return c;
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { if (fd_ >= 0) close(fd_); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
 private:
  int fd_;
};

struct Result {
  std::map<std::string, uint64_t> exits;
  uint64_t mmio_signals = 0, pio_signals = 0;
  int64_t elapsed_ns = 0;
  int64_t cpu_ns = 0;  // the vCPU thread's CPU time over the same span (guest + KVM + probes)
  bool fast_mmio_len0 = false;
};

absl::StatusOr<Result> RunVm(uint32_t repeat) {
  const uint32_t a = absl::GetFlag(FLAGS_mmio_addr);
  if (a < kRamSize || a > 0xffff0) {
    return absl::InvalidArgumentError("--mmio-addr must be in [0x10000, 0xffff0]");
  }
  const uint32_t port = absl::GetFlag(FLAGS_pio_port);
  if (port > 0xffff) return absl::InvalidArgumentError("--pio-port must be < 0x10000");
  if (absl::GetFlag(FLAGS_pio_value) > 0xffff || absl::GetFlag(FLAGS_mmio_value) > 0xffff) {
    return absl::InvalidArgumentError("--pio-value and --mmio-value are 16-bit");
  }

  Fd kvm(open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (kvm.get() < 0) return Errno("open /dev/kvm");
  if (ioctl(kvm.get(), KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
    return absl::FailedPreconditionError("unexpected KVM API version");
  }
  Fd vm(ioctl(kvm.get(), KVM_CREATE_VM, 0));
  if (vm.get() < 0) return Errno("KVM_CREATE_VM");
  // Needed by VMX without unrestricted guest for real mode; harmless elsewhere.
  (void)ioctl(vm.get(), KVM_SET_TSS_ADDR, 0xfffbd000ul);

  void* ram = mmap(nullptr, kRamSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ram == MAP_FAILED) return Errno("mmap guest RAM");
  std::unique_ptr<void, void (*)(void*)> ram_guard(ram, [](void* p) { munmap(p, kRamSize); });
  std::vector<uint8_t> code =
      Assemble(a, absl::GetFlag(FLAGS_mmio_value), absl::GetFlag(FLAGS_mmio_writes), port,
               absl::GetFlag(FLAGS_pio_value), absl::GetFlag(FLAGS_pio_writes));
  std::memcpy(static_cast<uint8_t*>(ram) + kCodeAddr, code.data(), code.size());
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.guest_phys_addr = 0;
  region.memory_size = kRamSize;
  region.userspace_addr = reinterpret_cast<uint64_t>(ram);
  if (ioctl(vm.get(), KVM_SET_USER_MEMORY_REGION, &region) != 0) {
    return Errno("KVM_SET_USER_MEMORY_REGION");
  }

  Result result;
  Fd mmio_efd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  Fd pio_efd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (mmio_efd.get() < 0 || pio_efd.get() < 0) return Errno("eventfd");
  if (absl::GetFlag(FLAGS_ioeventfd)) {
    // QEMU's modern notify: len 0 (any length, KVM's fast-MMIO form) when the
    // kernel has KVM_CAP_IOEVENTFD_ANY_LENGTH, else 2; never datamatch.
    result.fast_mmio_len0 = ioctl(kvm.get(), KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0;
    kvm_ioeventfd mmio{};
    mmio.addr = a;
    mmio.len = result.fast_mmio_len0 ? 0 : 2;
    mmio.fd = mmio_efd.get();
    if (ioctl(vm.get(), KVM_IOEVENTFD, &mmio) != 0) return Errno("KVM_IOEVENTFD (mmio)");
    // QEMU's legacy notify: 2-byte port write, datamatch = queue index.
    int64_t dm = absl::GetFlag(FLAGS_pio_datamatch);
    kvm_ioeventfd pio{};
    pio.addr = port;
    pio.len = 2;
    pio.fd = pio_efd.get();
    pio.datamatch = dm >= 0 ? static_cast<uint64_t>(dm) : absl::GetFlag(FLAGS_pio_value);
    pio.flags = KVM_IOEVENTFD_FLAG_PIO | KVM_IOEVENTFD_FLAG_DATAMATCH;
    if (ioctl(vm.get(), KVM_IOEVENTFD, &pio) != 0) return Errno("KVM_IOEVENTFD (pio)");
  }

  Fd vcpu(ioctl(vm.get(), KVM_CREATE_VCPU, 0));
  if (vcpu.get() < 0) return Errno("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (run_size <= 0) return Errno("KVM_GET_VCPU_MMAP_SIZE");
  void* run_map = mmap(nullptr, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0);
  if (run_map == MAP_FAILED) return Errno("mmap kvm_run");
  std::unique_ptr<void, std::function<void(void*)>> run_guard(
      run_map, [run_size](void* p) { munmap(p, run_size); });
  auto* run = static_cast<kvm_run*>(run_map);

  kvm_sregs sregs;
  if (ioctl(vcpu.get(), KVM_GET_SREGS, &sregs) != 0) return Errno("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl(vcpu.get(), KVM_SET_SREGS, &sregs) != 0) return Errno("KVM_SET_SREGS");
  auto reset_regs = [&]() -> absl::Status {
    kvm_regs regs{};
    regs.rip = kCodeAddr;
    regs.rflags = 0x2;
    if (ioctl(vcpu.get(), KVM_SET_REGS, &regs) != 0) return Errno("KVM_SET_REGS");
    return absl::OkStatus();
  };
  if (absl::Status s = reset_regs(); !s.ok()) return s;

  uint32_t done = 0;
  // CPU time as well as wall time: on a shared host the wall time also holds
  // whatever ran while this thread waited for a CPU; the probes' cost runs
  // on this thread (the tracepoints fire in its context), so it is in both.
  const auto start = std::chrono::steady_clock::now();
  const int64_t cpu_start = ThreadCpuNs();
  while (done < repeat) {
    if (ioctl(vcpu.get(), KVM_RUN, 0) != 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Errno("KVM_RUN");
    }
    switch (run->exit_reason) {
      case KVM_EXIT_HLT:
        ++result.exits["hlt"];
        if (++done < repeat) {
          if (absl::Status s = reset_regs(); !s.ok()) return s;
        }
        break;
      case KVM_EXIT_IO:
        ++result.exits["io"];  // a write nobody absorbed: nothing to emulate
        break;
      case KVM_EXIT_MMIO:
        ++result.exits["mmio"];
        if (!run->mmio.is_write) std::memset(run->mmio.data, 0, sizeof(run->mmio.data));
        break;
      case KVM_EXIT_INTR:
        ++result.exits["intr"];
        break;
      default:
        return absl::InternalError(absl::StrCat(
            "unexpected KVM exit ", run->exit_reason,
            run->exit_reason == KVM_EXIT_FAIL_ENTRY ? " (FAIL_ENTRY)" : "",
            run->exit_reason == KVM_EXIT_INTERNAL_ERROR ? " (INTERNAL_ERROR)" : "",
            run->exit_reason == KVM_EXIT_SHUTDOWN ? " (SHUTDOWN: guest triple fault)" : ""));
    }
  }
  result.elapsed_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  result.cpu_ns = ThreadCpuNs() - cpu_start;
  uint64_t v;
  if (read(mmio_efd.get(), &v, sizeof(v)) == sizeof(v)) result.mmio_signals = v;
  if (read(pio_efd.get(), &v, sizeof(v)) == sizeof(v)) result.pio_signals = v;
  return result;
}

constexpr uint32_t kVmId = 1;

absl::StatusOr<std::unique_ptr<HostProbes>> LoadProbes() {
  HostProbesOptions options;
  options.attach_vhost_user = absl::GetFlag(FLAGS_probe_vhost_user);
  absl::StatusOr<KvmTracepoints> kvm = ParseKvmTracepoints(absl::GetFlag(FLAGS_kvm_tracepoints));
  if (!kvm.ok()) return kvm.status();
  options.kvm_tracepoints = *kvm;
  options.capacity.max_vms = absl::GetFlag(FLAGS_max_vms);
  return HostProbes::Create(options);
}

// This process as vm kVmId, --mmio-addr and --pio-port its notify targets.
absl::Status TrackSelf(HostProbes& probes) {
  NotifyTarget targets[2];
  targets[0].space = NotifyTarget::Space::kMmio;
  targets[0].addr = absl::GetFlag(FLAGS_mmio_addr);
  targets[0].device_id = 0;
  targets[0].queue = 0;
  targets[1].space = NotifyTarget::Space::kPio;
  targets[1].addr = absl::GetFlag(FLAGS_pio_port);
  targets[1].device_id = 1;
  targets[1].value_is_queue = true;
  absl::Status s = probes.TrackProcess(getpid(), kVmId);
  if (s.ok()) s = probes.SetNotifyTargets(kVmId, targets);
  return s;
}

int Main() {
  const std::string mode = absl::GetFlag(FLAGS_attach_probes);
  if (mode != "none" && mode != "tracked" && mode != "untracked") {
    std::fprintf(stderr, "vkick-kvm-harness: --attach-probes must be none, tracked or untracked\n");
    return 2;
  }
  std::unique_ptr<HostProbes> probes;
  if (mode != "none") {
    auto p = LoadProbes();
    absl::Status s = p.ok() && mode == "tracked" ? TrackSelf(**p) : p.status();
    if (!s.ok()) {
      std::fprintf(stderr, "vkick-kvm-harness: %s\n", s.ToString().c_str());
      return 1;
    }
    probes = *std::move(p);
  }

  absl::StatusOr<Result> r = RunVm(absl::GetFlag(FLAGS_repeat));
  if (!r.ok()) {
    std::fprintf(stderr, "vkick-kvm-harness: %s\n", r.status().ToString().c_str());
    return 1;
  }
  const uint64_t repeat = absl::GetFlag(FLAGS_repeat);
  const uint64_t writes =
      (uint64_t{absl::GetFlag(FLAGS_mmio_writes)} + absl::GetFlag(FLAGS_pio_writes)) * repeat;
  nlohmann::json j = {
      {"pid", getpid()},
      {"mmio_writes", uint64_t{absl::GetFlag(FLAGS_mmio_writes)} * repeat},
      {"pio_writes", uint64_t{absl::GetFlag(FLAGS_pio_writes)} * repeat},
      {"repeat", repeat},
      {"mmio_addr", absl::GetFlag(FLAGS_mmio_addr)},
      {"pio_port", absl::GetFlag(FLAGS_pio_port)},
      {"pio_value", absl::GetFlag(FLAGS_pio_value)},
      {"ioeventfd", absl::GetFlag(FLAGS_ioeventfd)},
      {"mmio_ioeventfd_len0", r->fast_mmio_len0},
      {"exits", r->exits},
      {"ioeventfd_signals", {{"mmio", r->mmio_signals}, {"pio", r->pio_signals}}},
      {"elapsed_ns", r->elapsed_ns},
      {"cpu_ns", r->cpu_ns},
      {"writes_per_sec", r->elapsed_ns > 0 ? writes * 1e9 / r->elapsed_ns : 0.0},
      {"attach_probes", mode},
      {"probe_vhost_user", absl::GetFlag(FLAGS_probe_vhost_user)},
      {"kvm_tracepoints", absl::GetFlag(FLAGS_kvm_tracepoints)},
  };
  if (probes != nullptr) {
    absl::StatusOr<CounterSnapshot> c = probes->ReadCounters();
    if (!c.ok()) {
      std::fprintf(stderr, "vkick-kvm-harness: %s\n", c.status().ToString().c_str());
      return 1;
    }
    nlohmann::json counts = nlohmann::json::object();
    for (const NotificationCount& n : c->notifications) {
      if (n.vm_id == kVmId) {
        counts[absl::StrCat("device", n.device_id, "_queue", n.queue)] = n.count;
      }
    }
    for (const UnmatchedCount& u : c->unmatched_writes) {
      if (u.vm_id == kVmId) {
        counts[u.space == NotifyTarget::Space::kMmio ? "unmatched_mmio" : "unmatched_pio"] =
            u.count;
      }
    }
    counts["errors_map_full"] = c->errors.map_full;
    j["probe_counts"] = counts;
    j["probe_programs"] = probes->attached_programs();
  }
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace
}  // namespace vkick

int main(int argc, char** argv) {
  const vkick::CommandLine cl = vkick::ParseFlags(
      argc, argv,
      {.binary = "vkick-kvm-harness",
       .usage = "Runs a tiny real-mode guest through the raw KVM API: N MMIO writes and M port writes "
                "(ioeventfds registered like QEMU's virtio-pci), prints a JSON summary.\n"
                "  vkick-kvm-harness --mmio-writes=N --pio-writes=M [--pio-value=Q] [--repeat=R]",
       .flags_source = "kvm_harness"});
  if (!cl.positional.empty()) {
    std::fprintf(stderr, "vkick-kvm-harness: unexpected argument '%s'\n", cl.positional[0].c_str());
    return 2;
  }
  return vkick::Main();
}
