#include "exporters/http_server.h"

#include <arpa/inet.h>

#include <CivetServer.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace vkick {
namespace {

// Slow clients (slowloris): civetweb 1.15 has no per-source connection limit,
// so what bounds them is the worker count and the request deadline; see
// docs/operations.md ("/metrics under slow clients").
constexpr char kHttpWorkers[] = "16";
constexpr char kHttpRequestTimeoutMs[] = "2000";

void Respond(mg_connection* conn, int code, const char* status, const char* content_type,
             const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
            "Connection: close\r\n\r\n",
            code, status, content_type, body.size());
  mg_write(conn, body.data(), body.size());
}

// Handlers match by prefix in civetweb; insist on the exact path and method.
bool ExactGet(mg_connection* conn, const char* path) {
  const mg_request_info* ri = mg_get_request_info(conn);
  if (std::string(ri->local_uri ? ri->local_uri : "") != path ||
      std::string(ri->request_method) != "GET") {
    Respond(conn, 404, "Not Found", "text/plain; charset=utf-8", "not found\n");
    return false;
  }
  return true;
}

class MetricsHandler : public CivetHandler {
 public:
  explicit MetricsHandler(std::vector<std::shared_ptr<prometheus::Collectable>> c)
      : collectables_(std::move(c)) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    if (!ExactGet(conn, "/metrics")) return true;
    Respond(conn, 200, "OK", "text/plain; version=0.0.4; charset=utf-8",
            SerializeMetrics(collectables_));
    return true;
  }

 private:
  const std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
};

class HealthHandler : public CivetHandler {
 public:
  explicit HealthHandler(HealthCheck h) : health_(std::move(h)) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    if (!ExactGet(conn, "/healthz")) return true;
    HealthResult r = health_();
    if (r.ok) {
      Respond(conn, 200, "OK", "text/plain; charset=utf-8", "ok\n");
    } else {
      Respond(conn, 503, "Service Unavailable", "text/plain; charset=utf-8",
              absl::StrCat(r.reason, "\n"));
    }
    return true;
  }

 private:
  const HealthCheck health_;
};

// Everything not handled above (and non-GET methods on "/").
class NotFoundHandler : public CivetHandler {
 public:
  bool Reply(mg_connection* conn) {
    Respond(conn, 404, "Not Found", "text/plain; charset=utf-8", "not found\n");
    return true;
  }
  bool handleGet(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handlePost(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handleHead(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handlePut(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handleDelete(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handleOptions(CivetServer*, mg_connection* c) override { return Reply(c); }
  bool handlePatch(CivetServer*, mg_connection* c) override { return Reply(c); }
};

}  // namespace

absl::StatusOr<ListenAddress> ParseListenAddress(absl::string_view listen) {
  size_t colon = listen.rfind(':');
  if (colon == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen=", listen, ": expected HOST:PORT, e.g. 127.0.0.1:9470"));
  }
  ListenAddress a;
  a.host = std::string(listen.substr(0, colon));
  absl::string_view port = listen.substr(colon + 1);
  in_addr addr;
  if (inet_pton(AF_INET, a.host.c_str(), &addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--listen=", listen, ": host '", a.host, "' is not an IPv4 address (use 127.0.0.1)"));
  }
  if (!absl::SimpleAtoi(port, &a.port) || a.port < 0 || a.port > 65535 ||
      port.find_first_not_of("0123456789") != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen=", listen, ": port '", port, "' is not a number 0..65535"));
  }
  return a;
}

std::string SerializeMetrics(
    const std::vector<std::shared_ptr<prometheus::Collectable>>& collectables) {
  std::vector<prometheus::MetricFamily> families;
  for (const auto& c : collectables) {
    auto f = c->Collect();
    families.insert(families.end(), std::make_move_iterator(f.begin()),
                    std::make_move_iterator(f.end()));
  }
  return prometheus::TextSerializer().Serialize(families);
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    absl::string_view listen, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
    HealthCheck health) {
  absl::StatusOr<ListenAddress> addr = ParseListenAddress(listen);
  if (!addr.ok()) return addr.status();

  std::unique_ptr<MetricsHttpServer> s(new MetricsHttpServer());
  s->host_ = addr->host;
  std::string ports = absl::StrCat(addr->host, ":", addr->port);
  const char* options[] = {"listening_ports", ports.c_str(),
                           // A worker is held by one connection until it is
                           // done; a few slow clients must leave workers free.
                           "num_threads", kHttpWorkers,
                           // Total budget for the request headers (not reset
                           // by trickled bytes), and for writing the reply: a
                           // scraper sends its request in one segment.
                           "request_timeout_ms", kHttpRequestTimeoutMs,
                           // One request per connection: an idle keep-alive
                           // would hold a worker too.
                           "enable_keep_alive", "no", nullptr};
  try {
    s->server_ = std::make_unique<CivetServer>(options);
  } catch (const CivetException& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", listen, ": ", e.what(),
                     " (address in use or not local? try another --listen)"));
  }
  auto add = [&](const char* uri, std::unique_ptr<CivetHandler> h) {
    s->server_->addHandler(uri, h.get());
    s->handlers_.push_back(std::move(h));
  };
  add("/metrics", std::make_unique<MetricsHandler>(std::move(collectables)));
  add("/healthz", std::make_unique<HealthHandler>(std::move(health)));
  add("/", std::make_unique<NotFoundHandler>());

  std::vector<int> bound = s->server_->getListeningPorts();
  s->port_ = bound.empty() ? addr->port : bound.front();
  return s;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (server_) server_->close();
}

std::string MetricsHttpServer::url() const { return absl::StrCat("http://", host_, ":", port_); }

}  // namespace vkick
