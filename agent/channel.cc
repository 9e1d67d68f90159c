#include "agent/channel.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace vkick::agent {

absl::StatusOr<std::string> FindVirtioPort(const std::string& name, const std::string& sysfs_root,
                                           const std::string& dev_root) {
  DIR* d = opendir(sysfs_root.c_str());
  if (d == nullptr) return absl::NotFoundError(absl::StrCat(sysfs_root, ": no virtio-serial ports"));
  std::vector<std::string> ports;
  while (dirent* de = readdir(d)) {
    if (de->d_name[0] != '.') ports.push_back(de->d_name);
  }
  closedir(d);
  std::sort(ports.begin(), ports.end());
  for (const std::string& p : ports) {
    std::ifstream f(absl::StrCat(sysfs_root, "/", p, "/name"));
    std::string n;
    if (!std::getline(f, n)) continue;
    if (absl::StripTrailingAsciiWhitespace(n) == name) return absl::StrCat(dev_root, "/", p);
  }
  return absl::NotFoundError(absl::StrCat("no virtio-serial port named '", name, "' under ", sysfs_root));
}

absl::StatusOr<Connection> Connection::ConnectUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return absl::InvalidArgumentError("socket path too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::ErrnoToStatus(errno, "socket");
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect ", path, ": ", std::strerror(err)));
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return Connection(fd, true);
}

absl::StatusOr<Connection> Connection::OpenPort(const std::string& dev_path) {
  int fd = open(dev_path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("open ", dev_path, ": ", std::strerror(errno)));
  return Connection(fd, false);
}

Connection::Connection(Connection&& o) noexcept
    : fd_(o.fd_), is_socket_(o.is_socket_), out_(std::move(o.out_)), decoder_(std::move(o.decoder_)) {
  o.fd_ = -1;
}

Connection& Connection::operator=(Connection&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) close(fd_);
    fd_ = o.fd_;
    is_socket_ = o.is_socket_;
    out_ = std::move(o.out_);
    decoder_ = std::move(o.decoder_);
    o.fd_ = -1;
  }
  return *this;
}

Connection::~Connection() {
  if (fd_ >= 0) close(fd_);
}

absl::Status Connection::Send(const std::vector<uint8_t>& frame) {
  if (out_.size() + frame.size() > kMaxQueuedBytes)
    return absl::ResourceExhaustedError("peer is not reading: send queue full");
  out_.insert(out_.end(), frame.begin(), frame.end());
  return Flush();
}

absl::Status Connection::Flush() {
  while (!out_.empty()) {
    ssize_t n = is_socket_ ? send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL) : write(fd_, out_.data(), out_.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::OkStatus();
      return absl::UnavailableError(absl::StrCat("write: ", std::strerror(errno)));
    }
    out_.erase(out_.begin(), out_.begin() + n);
  }
  return absl::OkStatus();
}

absl::Status Connection::Receive(const proto::StreamDecoder::Sink& sink) {
  uint8_t buf[4096];
  while (true) {
    ssize_t n = read(fd_, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::OkStatus();
      return absl::UnavailableError(absl::StrCat("read: ", std::strerror(errno)));
    }
    if (n == 0) {
      decoder_.Finish(sink);
      return absl::UnavailableError("peer closed the channel");
    }
    decoder_.Feed(std::span<const uint8_t>(buf, static_cast<size_t>(n)), sink);
    if (decoder_.failed()) return absl::DataLossError("fatal framing error from the host");
  }
}

}  // namespace vkick::agent
