// The vkick-agent loop: registry -> probes -> samples -> channel, and
// policies -> control blocks (sysfs steer files for vkick_virtio_blk) -> acks.
// One thread, ppoll(); see docs/agent.md.
#pragma once

#include <signal.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "agent/channel.h"
#include "agent/control_writer.h"
#include "agent/counter_source.h"
#include "agent/kernel_disks.h"
#include "agent/policy_state.h"
#include "agent/registry.h"
#include "agent/vkick_disks.h"

namespace vkick::agent {

// The PCI domain of the fake coordinates vhost-user drivers get in the hello
// (they have no PCI function; two devices at one are rejected).
inline constexpr uint16_t kFakePciDomain = 0xffff;

struct AgentOptions {
  std::string connect_path;     // unix socket; empty: use port_name
  std::string port_name;        // virtio-serial port name; empty with connect_path empty: local only
  uint64_t interval_ns = 1'000'000'000;
  std::string run_dir = "/run/vkick";           // registry in <run_dir>/drivers
  std::string control_dir = "/dev/shm/vkick";   // control blocks must live here
  std::string agent_id;
  std::string kernel;
  bool json = false;             // one JSON line per interval on `out`
  int max_intervals = 0;         // > 0: exit after that many intervals (--once = 1)
  uint64_t registry_poll_ns = 100'000'000;
  uint64_t reconnect_min_ns = 100'000'000;
  uint64_t reconnect_max_ns = 5'000'000'000;
  std::string proc_root = "/proc";
  std::string sysfs_ports = "/sys/class/virtio-ports";
  std::string dev_root = "/dev";
  // Kernel disks are discovered under <sysfs_root>/block: the module
  // vkick_virtio_blk's always (steered through sysfs), stock virtio_blk's
  // (observe only) when the agent is given a DiskCounterSource.
  std::string sysfs_root = "/sys";
};

class Agent {
 public:
  using Clock = std::function<uint64_t()>;  // CLOCK_MONOTONIC ns
  // `disks`: the kernel virtio_blk disks' counters (BlockObserver), or null
  // when they are not observed (--observe_kernel_disks=false, or the block
  // tracepoints could not be attached). vkick_virtio_blk disks need none.
  Agent(AgentOptions opts, CounterSource* probes, Clock clock, std::ostream* out, DiskCounterSource* disks = nullptr);

  // Runs until *stop becomes true (set from a signal handler) or
  // max_intervals elapsed. Returns the process exit code.
  int Run(volatile const bool* stop, const sigset_t* run_mask);

 private:
  struct Driver {
    DriverEntry entry;
    std::unique_ptr<ControlWriter> control;
    bool gone = false;
    std::map<uint16_t, QueueTotals> prev;   // last cumulative read per queue
  };

  // A kernel disk: stock virtio_blk (watched in `disks_`, its one queue is
  // 0) or vkick_virtio_blk (read with `vkick_stats_`, steered).
  struct KernelDiskState {
    KernelDisk disk;
    std::map<uint16_t, QueueTotals> prev;  // last cumulative read per queue
    bool stats_error_logged = false;       // logged once per disk
    bool steer_error_logged = false;
  };
  // A policy message's queues, sorted (SplitPolicy).
  struct PolicySplit {
    proto::Policy applicable;             // for PolicyState (it counts unknown refs)
    std::vector<std::string> unwritten;   // "pid P" (no control block), "vkda q1" (steer refused)
    uint32_t observe_only = 0;            // queues of stock virtio_blk disks
  };
  // What one hello entry is: the device and whom it stands for.
  struct Announcement {
    AnnouncedDriver who;
    proto::GuestDevice dev;
    friend bool operator==(const Announcement&, const Announcement&) = default;
  };

  bool RescanRegistry();     // true when a driver was added
  bool RescanKernelDisks();  // true when the set of observed disks (or one's geometry) changed
  bool AddKernelDisk(uint32_t kdev, const KernelDisk& k);  // false: cannot be watched
  std::map<uint32_t, KernelDiskState>::iterator ForgetKernelDisk(std::map<uint32_t, KernelDiskState>::iterator it);
  DiskSnapshot ReadStockDisks();  // the block observer's counters (empty without one); errors logged
  void Tick(uint64_t now);
  void TryConnect(uint64_t now);
  void Disconnect(uint64_t now, const std::string& why, bool fast_retry);
  void SendHello();
  void OnMessage(proto::DecodeResult&& r, uint64_t now);
  void OnPolicy(const proto::Policy& p);
  // Sorts a policy's queues, writing the vkick_virtio_blk ones' steer files
  // on the way: a write the module refuses leaves its queue out (unwritten).
  PolicySplit SplitPolicy(const proto::Policy& p);
  // Writes a vkick_virtio_blk queue's steer file; a failure is counted and
  // logged once per disk.
  bool Steer(uint32_t kdev, const proto::QueuePolicy& q);
  std::string NameOf(const AnnouncedDriver& who) const;  // "pid P" or the disk's name
  bool HasControlBlock(int32_t pid) const;
  void WriteControl(int32_t pid, uint64_t now);
  void Send(const proto::Message& m);
  bool HelloIsStale() const;
  // The live drivers a hello can announce, in pid order, then the observed
  // kernel disks in dev_t order, within the protocol's bounds (<= 16
  // devices, <= 64 queues, no duplicate serial/PCI).
  std::vector<Announcement> Announceable(bool log) const;

  AgentOptions opts_;
  CounterSource* probes_;
  Clock clock_;
  std::ostream* out_;

  std::map<int32_t, Driver> drivers_;
  std::map<std::string, uint64_t> registry_rejected_;  // last scan, by reason
  std::map<int32_t, uint64_t> attach_failed_until_;    // pid -> next attach attempt
  PolicyState policy_;

  std::optional<Connection> conn_;
  std::vector<AnnouncedDriver> announced_;  // the current connection's hello
  std::vector<proto::GuestDevice> announced_devices_;  // and its devices (same order)
  DiskCounterSource* disks_;
  std::map<uint32_t, KernelDiskState> kernel_disks_;  // by kernel dev_t
  std::vector<std::string> kernel_disks_skipped_;     // last scan's (logged on change)
  std::set<uint32_t> watch_failed_;                   // logged once each
  DiskSnapshot disk_errors_;                          // last logged error counters
  VkickDiskStats vkick_stats_;                        // vkick_virtio_blk disks' stats files
  uint64_t next_connect_ns_ = 0;
  uint64_t backoff_ns_ = 0;
  uint64_t seq_ = 0;
  uint64_t last_read_ns_ = 0;
  std::string last_connect_error_;
  std::string pending_drop_;
  std::string last_disconnect_reason_;
  bool last_disconnect_quiet_ = false;
  bool conn_heard_ = false;  // the current connection received a frame  // set while the connection must not be destroyed yet
  // Counters (logged, reported in --json).
  uint64_t connects_ = 0, disconnects_ = 0, policies_ = 0, acks_ = 0, samples_sent_ = 0;
  uint64_t rejected_from_host_ = 0, skipped_queues_ = 0, unknown_queue_refs_ = 0;
  uint64_t map_full_ = 0, bad_queue_ = 0;
  uint64_t unreadable_ = 0;
  uint64_t kernel_policy_ignored_ = 0;  // policy queues naming a kernel disk (observe only)
  uint64_t steer_errors_ = 0;           // vkick_virtio_blk steer writes that failed
};

// "2026-11-22T21:55:34Z vkick-agent: <msg>" on stderr.
void Log(const std::string& msg);

}  // namespace vkick::agent
