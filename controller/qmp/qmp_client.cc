#include "controller/qmp/qmp_client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {

using json = nlohmann::json;

int PollTimeoutMs(absl::Time deadline) {
  absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  // Round up so a 0.4 ms remainder does not become a busy 0 ms poll.
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1 << 30));
}

// Waits for `events` on fd until the deadline. OK, kDeadlineExceeded or the
// poll error.
absl::Status PollFor(int fd, short events, absl::Time deadline, absl::string_view what) {
  for (;;) {
    struct pollfd p = {fd, events, 0};
    int n = ::poll(&p, 1, PollTimeoutMs(deadline));
    if (n > 0) return absl::OkStatus();  // readiness, HUP or ERR: the I/O call tells which
    if (n == 0) {
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("QMP: timed out waiting for ", what));
      }
      continue;
    }
    if (errno == EINTR) continue;
    return absl::ErrnoToStatus(errno, "QMP poll");
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<QmpClient>> QmpClient::Connect(absl::string_view path,
                                                              absl::Duration timeout,
                                                              QmpClientOptions options) {
  const absl::Time deadline = absl::Now() + timeout;
  struct sockaddr_un addr = {};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("QMP socket path \"", path,
                                                   "\" is empty or too long"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return absl::ErrnoToStatus(errno, "QMP socket()");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    // A unix stream connect only blocks when the listener's backlog is full.
    if (errno != EAGAIN && errno != EINPROGRESS) {
      int e = errno;
      return absl::UnavailableError(
          absl::StrCat("QMP connect ", path, ": ", std::strerror(e)));
    }
    absl::Status st = PollFor(fd.get(), POLLOUT, deadline, absl::StrCat("connect to ", path));
    if (!st.ok()) return st;
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return absl::UnavailableError(absl::StrCat("QMP connect ", path, ": ", std::strerror(err)));
    }
  }
  std::unique_ptr<QmpClient> c(new QmpClient(std::move(fd), std::string(path), options));
  struct ucred cred = {};
  socklen_t len = sizeof(cred);
  if (::getsockopt(c->fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return absl::ErrnoToStatus(errno, "QMP SO_PEERCRED");
  }
  c->peer_pid_ = cred.pid;

  absl::StatusOr<json> hello = c->ReadMessage(deadline);
  if (!hello.ok()) {
    if (absl::IsDeadlineExceeded(hello.status())) {
      // QEMU serves one client per monitor and does not greet a second one.
      return absl::DeadlineExceededError(absl::StrCat(
          "QMP ", path, ": no greeting within ", absl::FormatDuration(timeout),
          " (QEMU hung, or another client holds this monitor)"));
    }
    return hello.status();
  }
  absl::StatusOr<QmpGreeting> greeting = ParseGreeting(*hello);
  if (!greeting.ok()) {
    return absl::DataLossError(
        absl::StrCat("QMP ", path, ": bad greeting: ", greeting.status().message()));
  }
  c->greeting_ = std::move(*greeting);
  absl::StatusOr<json> caps =
      c->Execute("qmp_capabilities", nullptr, std::max(deadline - absl::Now(), absl::ZeroDuration()));
  if (!caps.ok()) return caps.status();
  return c;
}

absl::Status QmpClient::Fail(absl::Status st) {
  broken_ = st;
  fd_.Reset();
  return st;
}

absl::Status QmpClient::WriteAll(absl::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    ssize_t n = ::send(fd_.get(), data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      absl::Status st = PollFor(fd_.get(), POLLOUT, deadline, "QMP socket to accept a command");
      if (!st.ok()) {
        // A half-written command leaves the stream unusable.
        return Fail(st);
      }
      continue;
    }
    int e = errno;
    return Fail(absl::UnavailableError(absl::StrCat("QMP ", path_, ": write: ", std::strerror(e))));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> QmpClient::ReadMessage(absl::Time deadline) {
  if (!broken_.ok()) return broken_;
  for (;;) {
    size_t nl = buf_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      absl::StatusOr<json> msg = ParseQmpMessage(line, options_.max_message_bytes);
      if (!msg.ok()) {
        return Fail(absl::DataLossError(absl::StrCat("QMP ", path_, ": ", msg.status().message())));
      }
      return msg;
    }
    if (buf_.size() > options_.max_message_bytes) {
      return Fail(absl::DataLossError(absl::StrCat("QMP ", path_, ": message exceeds ",
                                                   options_.max_message_bytes, " bytes")));
    }
    absl::Status st = PollFor(fd_.get(), POLLIN, deadline, absl::StrCat("a reply from ", path_));
    if (!st.ok()) return st;
    char chunk[65536];
    ssize_t n = ::recv(fd_.get(), chunk, sizeof(chunk), 0);
    if (n > 0) {
      buf_.append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      return Fail(absl::UnavailableError(
          absl::StrCat("QMP ", path_, ": connection closed by QEMU (VM gone?)")));
    }
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
    int e = errno;
    return Fail(absl::UnavailableError(absl::StrCat("QMP ", path_, ": read: ", std::strerror(e))));
  }
}

void QmpClient::QueueEvent(const json& msg) {
  ++events_seen_;
  absl::StatusOr<QmpEvent> ev = ParseEvent(msg);
  if (!ev.ok()) return;  // an event without a name carries nothing we can use
  if (events_.size() >= options_.max_queued_events) {
    events_.pop_front();
    ++dropped_events_;
  }
  events_.push_back(std::move(*ev));
}

absl::StatusOr<json> QmpClient::Execute(absl::string_view command, const json& args) {
  return Execute(command, args, options_.default_command_timeout);
}

absl::StatusOr<json> QmpClient::Execute(absl::string_view command, const json& args,
                                        absl::Duration timeout) {
  std::vector<absl::StatusOr<json>> r = ExecuteAll({{std::string(command), args}}, timeout);
  return std::move(r[0]);
}

std::vector<absl::StatusOr<json>> QmpClient::ExecuteAll(const std::vector<QmpCommand>& commands,
                                                        absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const uint64_t first = next_id_;
  std::string text;
  for (const QmpCommand& c : commands) {
    json req = {{"execute", c.name}, {"id", next_id_++}};
    if (!c.args.is_null()) req["arguments"] = c.args;
    absl::StrAppend(&text, req.dump(), "\n");
  }
  std::vector<absl::StatusOr<json>> out;
  absl::Status st = broken_.ok() ? WriteAll(text, deadline) : broken_;
  early_.clear();
  batch_end_ = next_id_ - 1;
  for (size_t i = 0; i < commands.size(); ++i) {
    if (!st.ok()) {
      out.push_back(st);
      continue;
    }
    if (auto it = early_.find(first + i); it != early_.end()) {
      out.push_back(ReplyToStatus(it->second, commands[i].name));
      continue;
    }
    out.push_back(AwaitReply(first + i, commands[i].name, deadline, timeout));
    // A transport failure (or timeout) leaves the later replies unread.
    if (!out.back().ok() && !QmpErrorClass(out.back().status()).has_value()) {
      st = out.back().status();
    }
  }
  return out;
}

absl::StatusOr<json> QmpClient::AwaitReply(uint64_t id, absl::string_view command,
                                           absl::Time deadline, absl::Duration timeout) {
  for (;;) {
    absl::StatusOr<json> msg = ReadMessage(deadline);
    if (!msg.ok()) {
      if (absl::IsDeadlineExceeded(msg.status())) {
        return absl::DeadlineExceededError(absl::StrCat("QMP ", path_, ": no reply to ", command,
                                                        " within ", absl::FormatDuration(timeout)));
      }
      return msg.status();
    }
    absl::StatusOr<QmpMessageKind> kind = ClassifyQmpMessage(*msg);
    if (!kind.ok()) {
      return Fail(absl::DataLossError(absl::StrCat("QMP ", path_, ": ", kind.status().message())));
    }
    if (*kind == QmpMessageKind::kEvent) {
      QueueEvent(*msg);
      continue;
    }
    if (*kind == QmpMessageKind::kGreeting) {
      return Fail(absl::DataLossError(absl::StrCat("QMP ", path_, ": unexpected second greeting")));
    }
    // QEMU echoes "id" verbatim. An older id is the late reply to a command
    // we gave up on (timed out): skip it. Anything else is not our reply.
    auto rid = msg->find("id");
    const bool numeric_id = rid != msg->end() && rid->is_number_unsigned();
    if (numeric_id && rid->get<uint64_t>() < id) continue;
    // QEMU answers in order; a peer that does not may answer a later
    // command of the same batch first: kept for it.
    if (numeric_id && rid->get<uint64_t>() > id && rid->get<uint64_t>() <= batch_end_) {
      const uint64_t later = rid->get<uint64_t>();
      early_[later] = *std::move(msg);
      continue;
    }
    if (!numeric_id || rid->get<uint64_t>() != id) {
      return Fail(absl::DataLossError(
          absl::StrCat("QMP ", path_, ": reply to ", command, " with a missing or unknown id")));
    }
    return ReplyToStatus(*msg, command);
  }
}

absl::StatusOr<json> QmpClient::ReplyToStatus(const json& msg, absl::string_view command) {
  if (msg.contains("error")) return QmpErrorToStatus(msg["error"], command);
  return msg["return"];
}

absl::StatusOr<std::optional<QmpEvent>> QmpClient::WaitForEvent(absl::Duration timeout) {
  if (std::optional<QmpEvent> ev = PopEvent(); ev.has_value()) return ev;
  if (!broken_.ok()) return broken_;
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<json> msg = ReadMessage(deadline);
    if (!msg.ok()) {
      if (absl::IsDeadlineExceeded(msg.status())) return std::optional<QmpEvent>();
      return msg.status();
    }
    absl::StatusOr<QmpMessageKind> kind = ClassifyQmpMessage(*msg);
    if (!kind.ok()) {
      return Fail(absl::DataLossError(absl::StrCat("QMP ", path_, ": ", kind.status().message())));
    }
    if (*kind == QmpMessageKind::kEvent) {
      QueueEvent(*msg);
      if (std::optional<QmpEvent> ev = PopEvent(); ev.has_value()) return ev;
    }
    // A late reply to a timed-out command: ignore.
  }
}

std::optional<QmpEvent> QmpClient::PopEvent() {
  if (events_.empty()) return std::nullopt;
  QmpEvent ev = std::move(events_.front());
  events_.pop_front();
  return ev;
}

}  // namespace vkick
