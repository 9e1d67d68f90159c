// The exposition: exact text for a known snapshot, metric naming, bounded
// labels (ids discovery does not know never become label values).
#include <regex>
#include <set>
#include <string>

#include "exporters/metrics_table.h"
#include "exporters/vkick_collector.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/histogram.h"
#include "prometheus/text_serializer.h"
#include "tests/unit/daemon/fakes.h"

namespace vkick {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string Namer(uint32_t isa, uint32_t reason) {
  if (isa == 1 && reason == 30) return "IO_INSTRUCTION";
  if (isa == 1 && reason == 48) return "EPT_VIOLATION";
  return "other";
}

AttachedVm Attached(uint32_t vm_id, VmInfo info) {
  AttachedVm vm;
  vm.vm_id = vm_id;
  vm.info = std::move(info);
  return vm;
}

DaemonSnapshot KnownSnapshot() {
  DaemonSnapshot s;
  s.vms.push_back(Attached(3, testing::TwoDiskVm("web", 4242)));
  s.vms[0].info.qmp_path = "/run/web.qmp";
  s.qmp.push_back({"/run/web.qmp", true, {0, 0, 0, 0}});
  s.qmp.push_back({"/run/db.qmp", false, {5, 1, 2, 0}});
  prometheus::Histogram h({0.25, 1});  // binary-exact values: exact text
  h.Observe(0.125);
  h.Observe(0.5);
  s.discovery_duration = h.Collect();
  s.probes_enabled = true;
  s.probe_errors.control = 1;
  s.vms[0].probed = true;
  s.map_full[static_cast<int>(ProbeMap::kNotify)] = 4;  // four VMs refused (not attached here)
  s.kick_syscalls_attached = true;

  CounterSnapshot c;
  c.notifications = {
      {3, 1, 0, 3000},        // disk0 q0
      {3, 1, 1, 1000},        // disk0 q1
      {3, 2, 0, 7},           // disk1 q0 (legacy: value = queue)
      {3, 2, 9, 2},           // disk1 "queue 9": a guest wrote 9 to the legacy port
      {3, 2, 40000, 1},       // ... and 40000: same unknown bucket
      {3, kUnknownDevice, 0, 4},  // vhost-user kick fd of no known device
      {3, 77, 1, 1},          // a stale device id
      {99, 1, 0, 555},        // a VM that is not attached (any more)
  };
  c.unmatched_writes = {{3, NotifyTarget::Space::kMmio, 12}, {99, NotifyTarget::Space::kPio, 1}};
  c.interrupts = {{3, 0xfee00000, 0x4021, 10}, {3, 0xfee00000, 0x4022, 5},
                  {3, 0xfee00000, 0x4021, 1}};
  c.exits = {{3, 0, 1, 30, 100}, {3, 1, 1, 48, 20}, {3, 1, 1, 30, 1},
             {3, 7, 1, 30, 2},   // vCPU index beyond the discovered vCPUs
             {3, 0, 1, 12345, 3}, {99, 0, 1, 30, 9}};
  c.kick_fds = {{4242, 20, 11, 1, 0}, {4242, 21, 11, 1, 1}};
  c.errors.map_full = 2;
  c.errors.bad_queue = 3;
  s.counters = c;
  return s;
}

std::string Text(const DaemonSnapshot& s) {
  return prometheus::TextSerializer().Serialize(BuildMetricFamilies(s, Namer, "0.1.0"));
}

TEST(ExpositionTest, ExactTextForKnownSnapshot) {
  const char* kExpected = R"(# HELP vkick_build_info vkickd build information; always 1.
# TYPE vkick_build_info gauge
vkick_build_info{version="0.1.0"} 1
# HELP vkick_probes_attached 1 when the eBPF host probes are attached and readable, 0 with --no-probes or when reading them failed.
# TYPE vkick_probes_attached gauge
vkick_probes_attached 1
# HELP vkick_probe_kick_fd_bindings vhost-user kick eventfds the probes have bound to a virtqueue (learned from SET_VRING_KICK).
# TYPE vkick_probe_kick_fd_bindings gauge
vkick_probe_kick_fd_bindings 2
# HELP vkick_probe_errors_total Probe failures by reason: map_full, read_user_failed, bad_vhost_msg, bad_queue (in BPF); control (a map update from vkickd failed), read_counters (a scrape could not read the maps).
# TYPE vkick_probe_errors_total counter
vkick_probe_errors_total{reason="map_full"} 2
vkick_probe_errors_total{reason="read_user_failed"} 0
vkick_probe_errors_total{reason="bad_vhost_msg"} 0
vkick_probe_errors_total{reason="bad_queue"} 3
vkick_probe_errors_total{reason="control"} 1
vkick_probe_errors_total{reason="read_counters"} 0
# HELP vkick_probe_map_full_total VMs a full probe map refused, by map (tracked, notify): such a VM is not counted (vkick_vm_probed 0) and is tried again only when a VM leaves. Size the maps with --max-vms and --max-queues-per-vm.
# TYPE vkick_probe_map_full_total counter
vkick_probe_map_full_total{map="tracked"} 0
vkick_probe_map_full_total{map="notify"} 4
# HELP vkick_probe_kick_syscalls_attached 1 while the kick syscall programs (--vhost-user-kicks) are attached: only while a TCG VM with a vhost-user device or a --vhost-user frontend needs them, since every syscall on the host is traced meanwhile.
# TYPE vkick_probe_kick_syscalls_attached gauge
vkick_probe_kick_syscalls_attached 1
# HELP vkick_qmp_connected 1 while a VM is attached through this --qmp socket, else 0.
# TYPE vkick_qmp_connected gauge
vkick_qmp_connected{qmp="/run/web.qmp"} 1
vkick_qmp_connected{qmp="/run/db.qmp"} 0
# HELP vkick_qmp_errors_total QMP failures per --qmp socket by reason: connect (socket missing or refused), timeout (no answer in time), protocol (garbage reply), gone (connection closed under an attached VM).
# TYPE vkick_qmp_errors_total counter
vkick_qmp_errors_total{qmp="/run/web.qmp",reason="connect"} 0
vkick_qmp_errors_total{qmp="/run/web.qmp",reason="timeout"} 0
vkick_qmp_errors_total{qmp="/run/web.qmp",reason="protocol"} 0
vkick_qmp_errors_total{qmp="/run/web.qmp",reason="gone"} 0
vkick_qmp_errors_total{qmp="/run/db.qmp",reason="connect"} 5
vkick_qmp_errors_total{qmp="/run/db.qmp",reason="timeout"} 1
vkick_qmp_errors_total{qmp="/run/db.qmp",reason="protocol"} 2
vkick_qmp_errors_total{qmp="/run/db.qmp",reason="gone"} 0
# HELP vkick_discovery_duration_seconds Duration of one QMP discovery refresh of one VM, successful or not.
# TYPE vkick_discovery_duration_seconds histogram
vkick_discovery_duration_seconds_count 2
vkick_discovery_duration_seconds_sum 0.625
vkick_discovery_duration_seconds_bucket{le="0.25"} 1
vkick_discovery_duration_seconds_bucket{le="1"} 2
vkick_discovery_duration_seconds_bucket{le="+Inf"} 2
# HELP vkick_vm_info 1 per attached VM; vm is its QEMU -name (else "pid" and the process id), pid its QEMU process id.
# TYPE vkick_vm_info gauge
vkick_vm_info{vm="web",pid="4242"} 1
# HELP vkick_vm_probed 1 when the host probes count the VM (tracked, every notify address installed); 0 when they do not: a full probe map left it out (vkick_probe_map_full_total), or --no-probes.
# TYPE vkick_vm_probed gauge
vkick_vm_probed{vm="web"} 1
# HELP vkick_vm_running 1 while the VM's guest runs; 0 while it is paused, suspended, migrating or shut down (vkickctl status names the state), or departed. While 0 the control loop holds its queues' policy and lease.
# TYPE vkick_vm_running gauge
vkick_vm_running{vm="web"} 1
# HELP vkick_virtqueue_notifications_total Guest to host notifications (kicks) per virtqueue; every discovered queue is present from discovery on. device/queue "unknown" sums kicks for ids discovery does not know.
# TYPE vkick_virtqueue_notifications_total counter
vkick_virtqueue_notifications_total{vm="web",device="disk0",queue="0"} 3000
vkick_virtqueue_notifications_total{vm="web",device="disk0",queue="1"} 1000
vkick_virtqueue_notifications_total{vm="web",device="disk1",queue="0"} 7
vkick_virtqueue_notifications_total{vm="web",device="disk1",queue="unknown"} 3
vkick_virtqueue_notifications_total{vm="web",device="unknown",queue="unknown"} 5
# HELP vkick_vm_unmatched_io_writes_total Guest MMIO or PIO writes (space "mmio" or "pio") that exited to the host and matched no discovered notify address.
# TYPE vkick_vm_unmatched_io_writes_total counter
vkick_vm_unmatched_io_writes_total{vm="web",space="mmio"} 12
vkick_vm_unmatched_io_writes_total{vm="web",space="pio"} 0
# HELP vkick_vm_exits_total VM exits per vCPU index and decoded exit reason (kvm:kvm_exit; VMX and SVM hosts).
# TYPE vkick_vm_exits_total counter
vkick_vm_exits_total{vm="web",vcpu="0",reason="IO_INSTRUCTION"} 100
vkick_vm_exits_total{vm="web",vcpu="0",reason="other"} 3
vkick_vm_exits_total{vm="web",vcpu="1",reason="EPT_VIOLATION"} 20
vkick_vm_exits_total{vm="web",vcpu="1",reason="IO_INSTRUCTION"} 1
vkick_vm_exits_total{vm="web",vcpu="unknown",reason="IO_INSTRUCTION"} 2
# HELP vkick_vm_interrupts_total MSI interrupts injected into the VM (kvm:kvm_msi_set_irq), all vectors summed.
# TYPE vkick_vm_interrupts_total counter
vkick_vm_interrupts_total{vm="web"} 16
# HELP vkick_vm_interrupt_vectors Distinct MSI (address, data) vectors the probes have seen for the VM; vectors are guest-programmed, so they are counted, not used as labels.
# TYPE vkick_vm_interrupt_vectors gauge
vkick_vm_interrupt_vectors{vm="web"} 2
)";
  // Without a control loop its families are present but empty.
  std::string loop_families;
  bool after = false;
  for (const MetricSpec& m : MetricTable()) {
    if (after) {
      loop_families += "# HELP " + m.name + " " + m.help + "\n# TYPE " + m.name + " " +
                       MetricTypeName(m.type) + "\n";
    }
    if (m.id == Metric::kVmInterruptVectors) after = true;
  }
  EXPECT_EQ(Text(KnownSnapshot()), kExpected + loop_families);
}

TEST(ExpositionTest, ProbesDisabledGiveZerosNotGaps) {
  DaemonSnapshot s = KnownSnapshot();
  s.counters.reset();
  s.probes_enabled = false;
  std::string t = Text(s);
  EXPECT_THAT(t, HasSubstr("vkick_probes_attached 0\n"));
  EXPECT_THAT(t, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"web\",device=\"disk0\",queue=\"1\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("vkick_vm_interrupts_total{vm=\"web\"} 0\n"));
  EXPECT_THAT(t, Not(HasSubstr("=\"unknown\""))) << "no counters, no unknown buckets";
}

TEST(ExpositionTest, NamesFollowConventions) {
  const std::regex name_re("^vkick_[a-z0-9_]+$");
  const std::regex label_re("^[a-z][a-z0-9_]*$");
  std::set<std::string> names;
  std::set<Metric> ids;
  for (const MetricSpec& s : MetricTable()) {
    SCOPED_TRACE(s.name);
    EXPECT_TRUE(std::regex_match(s.name, name_re));
    EXPECT_TRUE(names.insert(s.name).second) << "duplicate name";
    EXPECT_TRUE(ids.insert(s.id).second) << "duplicate id";
    bool total = s.name.size() > 6 && s.name.substr(s.name.size() - 6) == "_total";
    EXPECT_EQ(total, s.type == prometheus::MetricType::Counter)
        << "counters, and only counters, end in _total";
    if (s.type == prometheus::MetricType::Histogram) {
      // Base units: seconds, or a dimensionless count (queue depth in requests).
      if (s.name != "vkick_virtqueue_depth") {
        EXPECT_THAT(s.name, ::testing::EndsWith("_seconds")) << "base units";
      }
    }
    EXPECT_FALSE(s.help.empty());
    for (const auto& l : s.labels) {
      EXPECT_TRUE(std::regex_match(l, label_re)) << l;
      EXPECT_NE(l.rfind("__", 0), 0u) << "reserved label";
    }
  }
  // Every family the collector emits is in the table, in order.
  auto fams = BuildMetricFamilies(KnownSnapshot(), Namer, "x");
  ASSERT_EQ(fams.size(), MetricTable().size());
  for (size_t i = 0; i < fams.size(); ++i) {
    EXPECT_EQ(fams[i].name, MetricTable()[i].name);
    EXPECT_EQ(Spec(MetricTable()[i].id).name, MetricTable()[i].name);
    for (const auto& m : fams[i].metric) {
      if (fams[i].type == prometheus::MetricType::Histogram) continue;
      ASSERT_EQ(m.label.size(), MetricTable()[i].labels.size()) << fams[i].name;
      for (size_t l = 0; l < m.label.size(); ++l) {
        EXPECT_EQ(m.label[l].name, MetricTable()[i].labels[l]);
      }
    }
  }
}

TEST(ExpositionTest, GuestChosenIdsNeverBecomeLabelValues) {
  DaemonSnapshot s = KnownSnapshot();
  CounterSnapshot& c = *s.counters;
  // A hostile guest: every legacy queue value, bogus devices, many vectors,
  // vCPU indices beyond the VM, plus counters of VMs that are not attached.
  for (uint32_t i = 0; i < 20000; ++i) {
    c.notifications.push_back({3, 2, static_cast<uint16_t>(i), 1});
    c.notifications.push_back({3, static_cast<uint16_t>(100 + i % 60000), 0, 1});
    c.notifications.push_back({1000 + i, 1, 0, 1});
    c.interrupts.push_back({3, 0xfee00000ull + i, i, 1});
    c.exits.push_back({3, 2 + i, 1, 30, 1});
  }
  auto fams = BuildMetricFamilies(s, Namer, "x");
  std::set<std::string> allowed_vm = {"web"}, allowed_dev = {"disk0", "disk1", "unknown"},
                        allowed_q = {"0", "1", "unknown"}, allowed_vcpu = {"0", "1", "unknown"};
  size_t series = 0;
  for (const auto& f : fams) {
    for (const auto& m : f.metric) {
      ++series;
      for (const auto& l : m.label) {
        if (l.name == "vm") {
          EXPECT_TRUE(allowed_vm.count(l.value)) << l.value;
        }
        if (l.name == "device") {
          EXPECT_TRUE(allowed_dev.count(l.value)) << l.value;
        }
        if (l.name == "queue") {
          EXPECT_TRUE(allowed_q.count(l.value)) << l.value;
        }
        if (l.name == "vcpu") {
          EXPECT_TRUE(allowed_vcpu.count(l.value)) << l.value;
        }
      }
    }
  }
  // Same series as the known snapshot: nothing new was created.
  size_t known = 0;
  for (const auto& f : BuildMetricFamilies(KnownSnapshot(), Namer, "x")) known += f.metric.size();
  EXPECT_EQ(series, known);
  std::string t = prometheus::TextSerializer().Serialize(fams);
  EXPECT_THAT(t, HasSubstr("vkick_vm_interrupt_vectors{vm=\"web\"} 20002\n"))
      << "vectors are counted, not labelled";
  EXPECT_THAT(t, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"web\",device=\"disk1\",queue=\"unknown\"} 20002\n"))
      << "legacy values 1..19999 plus the 9 and 40000 above (0 is a real queue)";
}

TEST(ExpositionTest, SameVmNameTwiceStaysDistinct) {
  DaemonSnapshot s;
  s.vms.push_back(Attached(1, testing::TwoDiskVm("twin", 100)));
  s.vms.push_back(Attached(2, testing::TwoDiskVm("twin", 200)));
  CounterSnapshot c;
  c.notifications = {{1, 1, 0, 5}, {2, 1, 0, 6}};
  s.counters = c;
  std::string t = Text(s);
  EXPECT_THAT(t, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"twin\",device=\"disk0\",queue=\"0\"} 5\n"));
  EXPECT_THAT(t, HasSubstr(
      "vkick_virtqueue_notifications_total{vm=\"twin/pid200\",device=\"disk0\",queue=\"0\"} 6\n"));
  EXPECT_THAT(t, HasSubstr("vkick_vm_info{vm=\"twin/pid200\",pid=\"200\"} 1\n"));
}

TEST(ExpositionTest, LoopFamiliesPolicyChannelAndGuestHistograms) {
  LoopSnapshot l;
  QueueView v;
  v.key = {"vhost-user", "blk0", 0};
  v.spec = {proto::KickMode::kAdaptive, 1, 0};
  v.source = PolicySource::kVm;
  v.b = 16;
  v.t_ns = 250'000;
  v.generation = 7;
  v.acked_generation = 7;
  v.has_sample = true;
  v.guest_lease = proto::LeaseState::kActive;
  v.requests_total = 100;
  v.guest_kicks_total = 7;
  v.timer_kicks_total = 1;
  v.depth_hist[0] = 10;  // depth 1
  v.depth_hist[4] = 90;  // 16..31
  v.depth_sum = 10 + 90 * 20;
  v.latency_hist[7] = 100;  // [64, 128) us
  v.latency_sum_s = 100 * 96e-6;
  v.policy_switches = 2;
  QueueView idle = v;
  idle.key.queue = 1;
  idle.has_sample = false;  // no agent data: no guest series, policy series only
  idle.acked_generation = 0;
  l.queues = {v, idle};
  AgentChannelSnapshot a;
  a.vm = "vhost-user";
  a.connected = 1;
  a.rejected[static_cast<size_t>(proto::Rejection::kBadMagic)] = 2;
  a.dropped = 2;
  l.agents = {a};
  l.agent_refused[static_cast<size_t>(AgentRefusal::kHelloTimeout)] = 4;
  l.admin_refused = {1, 0, 3};
  l.state_load_errors = 2;
  prometheus::Histogram h({0.001});
  h.Observe(0.0005);
  l.loop_duration = h.Collect();
  DaemonSnapshot d;
  std::string t = prometheus::TextSerializer().Serialize(BuildMetricFamilies(d, Namer, "x", &l));
  const char* want[] = {
      R"(vkick_queue_policy_info{vm="vhost-user",device="blk0",queue="0",mode="adaptive",source="vm"} 1)",
      R"(vkick_queue_batch_threshold{vm="vhost-user",device="blk0",queue="0"} 16)",
      R"(vkick_queue_defer_bound_seconds{vm="vhost-user",device="blk0",queue="0"} 0.00025)",
      R"(vkick_queue_policy_acked{vm="vhost-user",device="blk0",queue="0"} 1)",
      R"(vkick_queue_policy_acked{vm="vhost-user",device="blk0",queue="1"} 0)",
      R"(vkick_queue_lease_state{vm="vhost-user",device="blk0",queue="0",state="active"} 1)",
      R"(vkick_queue_lease_state{vm="vhost-user",device="blk0",queue="0",state="expired"} 0)",
      R"(vkick_policy_switches_total{vm="vhost-user",device="blk0",queue="0"} 2)",
      R"(vkick_agent_connected{vm="vhost-user"} 1)",
      R"(vkick_agent_messages_rejected_total{vm="vhost-user",reason="bad_magic"} 2)",
      R"(vkick_agent_messages_rejected_total{vm="vhost-user",reason="rate_limited"} 0)",
      R"(vkick_agent_connections_dropped_total{vm="vhost-user"} 2)",
      R"(vkick_agent_connections_refused_total{reason="hello_timeout"} 4)",
      R"(vkick_agent_connections_refused_total{reason="peer_limit"} 0)",
      R"(vkick_agent_connections_refused_total{reason="host_limit"} 0)",
      R"(vkick_agent_connections_refused_total{reason="vm_channel_limit"} 0)",
      R"(vkick_agent_messages_rejected_total{vm="vhost-user",reason="device_owned"} 0)",
      R"(vkick_admin_requests_refused_total{reason="peer_credentials"} 1)",
      R"(vkick_admin_requests_refused_total{reason="busy"} 0)",
      R"(vkick_admin_requests_refused_total{reason="deadline"} 3)",
      R"(vkick_policy_state_load_errors_total 2)",
      R"(vkick_control_loop_duration_seconds_count 1)",
      R"(vkick_virtqueue_depth_bucket{vm="vhost-user",device="blk0",queue="0",le="1"} 10)",
      R"(vkick_virtqueue_depth_bucket{vm="vhost-user",device="blk0",queue="0",le="15"} 10)",
      R"(vkick_virtqueue_depth_bucket{vm="vhost-user",device="blk0",queue="0",le="31"} 100)",
      R"(vkick_virtqueue_depth_bucket{vm="vhost-user",device="blk0",queue="0",le="+Inf"} 100)",
      R"(vkick_virtqueue_depth_count{vm="vhost-user",device="blk0",queue="0"} 100)",
      R"(vkick_virtqueue_depth_sum{vm="vhost-user",device="blk0",queue="0"} 1810)",
      R"(vkick_virtqueue_request_latency_seconds_bucket{vm="vhost-user",device="blk0",queue="0",le="6.4e-05"} 0)",
      R"(vkick_virtqueue_request_latency_seconds_bucket{vm="vhost-user",device="blk0",queue="0",le="0.000128"} 100)",
      R"(vkick_virtqueue_requests_total{vm="vhost-user",device="blk0",queue="0"} 100)",
      R"(vkick_virtqueue_guest_kicks_total{vm="vhost-user",device="blk0",queue="0"} 7)",
      R"(vkick_virtqueue_guest_timer_kicks_total{vm="vhost-user",device="blk0",queue="0"} 1)",
  };
  for (const char* w : want) EXPECT_THAT(t, HasSubstr(w));
  EXPECT_THAT(t, Not(HasSubstr(R"(vkick_virtqueue_requests_total{vm="vhost-user",device="blk0",queue="1"})")));
  EXPECT_THAT(t, Not(HasSubstr(R"(reason="none")")));
}

}  // namespace
}  // namespace vkick
