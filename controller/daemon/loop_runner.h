// Runs the control loop inside vkickd: every --control-interval (or at once
// when an agent says hello or an operator changes a policy) it gathers the
// queues (discovery's VMs and the --vhost-user declarations), the probes'
// notification totals and the agents' samples, steps the ControlLoop, sends
// the policies, and publishes a LoopSnapshot for /metrics and the admin
// socket. Policy changes from the admin socket are persisted in the state
// directory before they are acknowledged.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "controller/admin/admin_protocol.h"
#include "controller/daemon/agent_port.h"
#include "controller/channel/agent_server.h"
#include "controller/control/policy.h"
#include "controller/daemon/daemon.h"
#include "controller/daemon/log.h"
#include "controller/loop/control_loop.h"
#include "controller/loop/loop_snapshot.h"
#include "prometheus/histogram.h"

namespace vkick {

// --vhost-user=ID=SOCKET_PATH: a host-process vhost-user driver.
struct VhostUserDecl {
  std::string id;           // device label and the serial its agent reports
  std::string socket_path;  // the vhost-user export socket (documentation, probes)
};
absl::StatusOr<VhostUserDecl> ParseVhostUserDecl(absl::string_view flag);

struct LoopRunnerOptions {
  absl::Duration interval = absl::Seconds(1);
  LoopConfig loop;
  PolicySpec default_policy;
  std::string state_dir;            // "" = no persistence
  bool state_dir_required = false;  // given explicitly: failing to use it is fatal
  std::string vhost_user_vm = "vhost-user";
  std::vector<VhostUserDecl> vhost_user;
  // The probes count kicks made by write() (--vhost_user_kicks). Off, a
  // discovered vhost-user device's kicks are the guest's count: under TCG no
  // probe would see them, and a zero host count would distrust every sample.
  bool vhost_user_kicks_counted = false;
  LogSink log = LogToStderr;
};

// The known devices an agent on --agent-socket is matched against.
std::vector<ChannelDevice> VhostUserChannelDevices(const LoopRunnerOptions& o);

// The AgentServer tag of a VM's virtio-serial channel at `path`.
inline constexpr char kVmAgentTagPrefix[] = "virtio-serial ";
inline std::string VmAgentTag(const std::string& path) { return kVmAgentTagPrefix + path; }

// Where --all's spec is kept (PolicyStore persists entries only).
inline constexpr char kDefaultPolicyFile[] = "default-policy.v1";

class LoopRunner {
 public:
  LoopRunner(LoopRunnerOptions options, Daemon& daemon);
  ~LoopRunner();

  // Creates the state dir and restores policies. Errors only when the state
  // dir was required; otherwise logs and runs without persistence.
  absl::Status Init();
  // `listening`: it serves --agent-socket (its vm's series always exist).
  void SetAgentServer(AgentServer* server, bool listening = true) {
    server_ = server;
    has_listener_ = listening;
  }
  // VMs whose QMP discovery found a virtio-serial agent port: the runner
  // connects to it (once per step while it is not connected).
  void SetAgentPorts(const AgentPortRegistry* ports) { ports_ = ports; }
  // The admin socket's refusals, in kAdminRefusalNames order.
  void SetAdminRefusedCounter(std::function<std::array<uint64_t, 3>()> f) {
    admin_refused_ = std::move(f);
  }
  // Steps once now, then every interval on its own thread.
  void Start();
  void Stop();
  void Wake();  // step now (thread-safe, cheap)

  // One step, synchronously (tests; the thread calls it too).
  void StepOnce();

  // The host-counted notification totals of `queues` that the probes cover,
  // now (AgentServerOptions::host_totals: stamps samples on arrival). Reads
  // those queues' counters only; uses the queue naming of the last step;
  // thread-safe.
  std::map<QueueKey, uint64_t> HostTotalsNow(const std::set<QueueKey>& queues);

  // `peer`: who asked (SO_PEERCRED), named in the log of a policy change.
  std::string HandleAdmin(const AdminRequest& req, const AdminPeer& peer = {});
  LoopSnapshot Snapshot() const;
  PolicyTable Table() const;

 private:
  // `all`: the change was `--all` (it set the default: keep it too).
  absl::Status Persist(const PolicyTable& t, bool all);
  // Connects to the VM's agent port unless `live_tags` (AgentServer::LiveTags)
  // has it open.
  void ConnectVmAgent(const AttachedVm& vm, const std::string& name,
                      const std::set<std::string>& live_tags);
  // Closes the VM channels in `live_tags` that are not in `vm_tags`.
  void CloseStaleVmChannels(const std::set<std::string>& live_tags,
                            const std::set<std::string>& vm_tags);
  // Adds to `inputs` the --vhost-user queues only agents announced (not in
  // the probes' pseudo-VM), until their lease runs out once unreported.
  void AddAnnouncedVhostQueues(const std::set<QueueKey>& connected, int64_t now_ns,
                               std::vector<QueueInput>& inputs) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(absl::string_view s) const { options_.log(s); }

  const LoopRunnerOptions options_;
  Daemon& daemon_;
  AgentServer* server_ = nullptr;
  bool has_listener_ = false;
  const AgentPortRegistry* ports_ = nullptr;
  std::map<std::string, std::string> port_errors_;  // tag -> last logged error (loop thread)
  std::function<std::array<uint64_t, 3>()> admin_refused_;
  prometheus::Histogram duration_;

  mutable absl::Mutex mu_;
  PolicyTable table_ ABSL_GUARDED_BY(mu_);
  ControlLoop loop_ ABSL_GUARDED_BY(mu_);
  std::vector<QueueView> views_ ABSL_GUARDED_BY(mu_);
  // --vhost-user queues agents announced -> the last step one reported on
  // it (bounded by the guard: <= 64 per declared device).
  std::map<QueueKey, int64_t> vhost_seen_ ABSL_GUARDED_BY(mu_);
  bool persist_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t save_errors_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t load_errors_ ABSL_GUARDED_BY(mu_) = 0;  // state files ignored at start

  // Host-counted queues of the last step -> their probe ids (a leaf lock:
  // HostTotalsNow runs on agent reader threads).
  absl::Mutex ids_mu_;
  std::map<QueueKey, ProbeQueueId> counted_ids_ ABSL_GUARDED_BY(ids_mu_);

  absl::Mutex wake_mu_;
  bool wake_ ABSL_GUARDED_BY(wake_mu_) = false;
  bool stop_ ABSL_GUARDED_BY(wake_mu_) = false;
  std::thread thread_;
};

// Bucket bounds of vkick_control_loop_duration_seconds.
const std::vector<double>& LoopDurationBuckets();

}  // namespace vkick
