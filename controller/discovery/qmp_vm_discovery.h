// VmDiscovery over a live QEMU's QMP socket.
//
// Refresh() asks QEMU (query-name, query-cpus-fast, query-pci,
// x-query-virtio, qom-get of the virtio-pci properties, query-chardev) and
// turns the answers into VmInfo with notify targets (virtio_pci_layout.h).
// Per-device properties that cannot change while the device exists (type,
// disable-legacy/modern, page-per-vq, num-queues, chardev path) are cached
// by QOM path, so a periodic refresh costs a handful of QMP round trips; the
// BARs are re-read every time because firmware and guests move them.
//
// Not thread-safe: one thread drives Refresh() and WaitForEvent() (they
// share one QMP connection, which serves one command at a time anyway).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "controller/discovery/virtio_pci_layout.h"
#include "controller/discovery/vm_model.h"
#include "controller/qmp/qmp_client.h"

namespace vkick {

// Events after which devices or BARs may have changed: refresh.
bool IsDiscoveryEvent(absl::string_view event_name);

class QmpVmDiscovery : public VmDiscovery {
 public:
  // Connects to the QMP socket at `path`; `timeout` bounds the connect and
  // handshake and every later QMP command.
  static absl::StatusOr<std::unique_ptr<QmpVmDiscovery>> Connect(std::string path,
                                                                 absl::Duration timeout);

  absl::StatusOr<VmInfo> Refresh() override;
  // Returns true at the first discovery event; false once nothing is left
  // to read by the deadline (a zero timeout drains what is already there).
  absl::StatusOr<bool> WaitForEvent(absl::Duration timeout) override;
  int event_fd() const override { return client_->fd(); }

  pid_t pid() const { return client_->peer_pid(); }
  QmpClient& client() { return *client_; }

 private:
  struct StaticProps {
    std::string type;
    VirtioPciProps props;
    std::string chardev;
    std::string socket_path;
  };
  // Where an anonymous proxy (no id=) sits: learnt once per QOM path.
  struct AnonProxy {
    int devfn = -1;
    std::string parent_bus;  // QOM path of the bus
  };

  QmpVmDiscovery(std::string path, std::unique_ptr<QmpClient> client)
      : path_(std::move(path)), client_(std::move(client)) {}

  absl::StatusOr<StaticProps> LoadStaticProps(const std::string& qom_path,
                                              std::optional<nlohmann::json>& chardevs);
  // qom-get; nullopt when QEMU answers with an error (no such property or
  // object): the caller falls back. Transport errors are returned.
  absl::StatusOr<std::optional<nlohmann::json>> TryQomGet(const std::string& path,
                                                          const std::string& property);
  absl::StatusOr<uint16_t> LoadNumQueues(const std::string& qom_path);
  absl::StatusOr<std::string> ResolveSocketPath(const std::string& chardev,
                                                const nlohmann::json* chardevs);
  absl::StatusOr<uint16_t> DeviceIdFor(const std::string& label);
  // info.kvm from query-kvm, asked once per connection (the accelerator
  // cannot change) and only for a VM with a vhost-user device.
  absl::Status LoadKvm(VmInfo& info);

  std::string path_;
  std::unique_ptr<QmpClient> client_;
  std::map<std::string, StaticProps> props_cache_;  // by QOM path
  std::map<std::string, AnonProxy> anon_cache_;     // by QOM path
  std::map<std::string, uint16_t> device_ids_;      // by label, never reused
  uint16_t next_device_id_ = 0;
  std::optional<std::string> name_;  // -name, or "pid<N>"; asked once
  std::optional<std::string> uuid_;  // -uuid; asked once ("" if QEMU refused)
  bool kvm_asked_ = false;
  std::optional<bool> kvm_;
};

}  // namespace vkick
