// A minimal blocking HTTP/1.1 GET over loopback TCP, for tests (no client
// library needed; the server closes the connection after each reply).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace vkick::testing {

struct HttpReply {
  int code = 0;
  std::string headers;  // status line + headers
  std::string body;
};

// `timeout_s`: per read, like a scraper's timeout (Prometheus' default is 10 s).
inline absl::StatusOr<HttpReply> HttpGet(int port, const std::string& path,
                                         const std::string& method = "GET", int timeout_s = 5) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket");
  timeval tv{timeout_s, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("connect 127.0.0.1:", port));
  }
  std::string req = absl::StrCat(method, " ", path,
                                 " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (::write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return absl::InternalError("write");
  }
  std::string raw;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    raw.append(buf, n);
  }
  ::close(fd);
  size_t split = raw.find("\r\n\r\n");
  if (split == std::string::npos || raw.size() < 12) {
    return absl::DataLossError(absl::StrCat("bad reply: ", raw));
  }
  HttpReply r;
  r.headers = raw.substr(0, split);
  r.body = raw.substr(split + 4);
  if (!absl::SimpleAtoi(raw.substr(9, 3), &r.code)) return absl::DataLossError(raw);
  return r;
}

}  // namespace vkick::testing
