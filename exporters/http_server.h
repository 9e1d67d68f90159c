// vkickd's HTTP endpoint (civetweb): GET /metrics (Prometheus text format
// 0.0.4 over the given collectables), GET /healthz (200 "ok" or 503 with the
// reason), 404 for anything else. Loopback by default; no TLS, no files.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/collectable.h"

class CivetServer;
class CivetHandler;

namespace vkick {

struct ListenAddress {
  std::string host;  // IPv4 literal ("127.0.0.1", "0.0.0.0")
  int port = 0;      // 0: any free port (see MetricsHttpServer::port())
};
// Parses "HOST:PORT" strictly; the error says what is wrong.
absl::StatusOr<ListenAddress> ParseListenAddress(absl::string_view listen);

struct HealthResult {
  bool ok = false;
  std::string reason;
};
using HealthCheck = std::function<HealthResult()>;

class MetricsHttpServer {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      absl::string_view listen, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
      HealthCheck health);
  ~MetricsHttpServer();  // stops serving (joins civetweb's threads)
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  // "http://HOST:PORT" with the port actually bound.
  std::string url() const;

 private:
  MetricsHttpServer() = default;

  std::string host_;
  int port_ = 0;
  std::vector<std::unique_ptr<CivetHandler>> handlers_;
  std::unique_ptr<CivetServer> server_;  // destroyed first: stops threads
};

// The exposition of `collectables` as the /metrics body.
std::string SerializeMetrics(
    const std::vector<std::shared_ptr<prometheus::Collectable>>& collectables);

}  // namespace vkick
