// A QMP client over a unix socket. Thin: framing and deadlines here, all
// parsing in qmp_parse.h.
//
// Every wait is bounded by a deadline (poll()), every message by a size
// limit. Errors: kUnavailable (cannot connect, or the peer closed: the VM went
// away), kDeadlineExceeded (no answer in time: a hung QEMU, or another client
// holds the monitor), kDataLoss (the peer sent bytes that are not QMP). After
// kDataLoss or kUnavailable the connection is dead and every later call fails
// the same way; after kDeadlineExceeded it stays usable, because commands
// carry an id and a late reply to an abandoned command is discarded.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "controller/qmp/qmp_parse.h"
#include "common/unique_fd.h"
#include "nlohmann/json.hpp"

namespace vkick {

// One command of QmpClient::ExecuteAll.
struct QmpCommand {
  std::string name;
  nlohmann::json args = nullptr;  // null: no "arguments"
};

struct QmpClientOptions {
  size_t max_message_bytes = kDefaultMaxQmpMessageBytes;
  // Events not yet consumed by WaitForEvent/PopEvent; the oldest are dropped
  // beyond this (counted in dropped_events()).
  size_t max_queued_events = 256;
  absl::Duration default_command_timeout = absl::Seconds(5);
};

class QmpClient {
 public:
  // Connects, reads the greeting and negotiates capabilities, all within
  // `timeout`.
  static absl::StatusOr<std::unique_ptr<QmpClient>> Connect(absl::string_view path,
                                                            absl::Duration timeout,
                                                            QmpClientOptions options = {});

  // Runs `command` (with `args` unless null) and returns its "return" member.
  // A QMP error reply is a status with QmpErrorClass() set.
  absl::StatusOr<nlohmann::json> Execute(absl::string_view command,
                                         const nlohmann::json& args = nullptr);
  absl::StatusOr<nlohmann::json> Execute(absl::string_view command, const nlohmann::json& args,
                                         absl::Duration timeout);
  // Sends every command at once and returns their replies in order (QEMU
  // answers in-band commands in order): one round trip for all, where a
  // fleet of VMs pays per round trip in context switches. After a transport
  // error or timeout the remaining replies carry that error.
  std::vector<absl::StatusOr<nlohmann::json>> ExecuteAll(const std::vector<QmpCommand>& commands,
                                                         absl::Duration timeout);
  std::vector<absl::StatusOr<nlohmann::json>> ExecuteAll(const std::vector<QmpCommand>& commands) {
    return ExecuteAll(commands, options_.default_command_timeout);
  }

  // The next event, waiting up to `timeout` for one; nullopt if none came.
  absl::StatusOr<std::optional<QmpEvent>> WaitForEvent(absl::Duration timeout);
  // A queued event without waiting or reading the socket.
  std::optional<QmpEvent> PopEvent();

  // The socket, for the caller's poll/epoll: readable when an event (or the
  // peer closing) is waiting. Events read during a command wait in PopEvent()
  // instead, so drain those after every command.
  int fd() const { return fd_.get(); }
  // The QEMU process at the other end (SO_PEERCRED at connect time).
  pid_t peer_pid() const { return peer_pid_; }
  const QmpGreeting& greeting() const { return greeting_; }
  uint64_t dropped_events() const { return dropped_events_; }
  // Number of events read so far (queued or not): lets callers notice that
  // something happened even if someone else consumed the event.
  uint64_t events_seen() const { return events_seen_; }

 private:
  QmpClient(UniqueFd fd, std::string path, QmpClientOptions options)
      : fd_(std::move(fd)), path_(std::move(path)), options_(options) {}

  // Reads one message (any kind) before `deadline`. Events are returned too.
  absl::StatusOr<nlohmann::json> ReadMessage(absl::Time deadline);
  absl::Status WriteAll(absl::string_view data, absl::Time deadline);
  static absl::StatusOr<nlohmann::json> ReplyToStatus(const nlohmann::json& reply,
                                                      absl::string_view command);
  // Reads until the reply to command `id`, queueing events on the way.
  absl::StatusOr<nlohmann::json> AwaitReply(uint64_t id, absl::string_view command,
                                            absl::Time deadline, absl::Duration timeout);
  void QueueEvent(const nlohmann::json& msg);
  // Marks the connection dead with `st` and returns it.
  absl::Status Fail(absl::Status st);

  UniqueFd fd_;
  std::string path_;
  QmpClientOptions options_;
  pid_t peer_pid_ = 0;
  QmpGreeting greeting_;
  std::string buf_;  // bytes read but not yet framed
  std::deque<QmpEvent> events_;
  uint64_t next_id_ = 1;
  uint64_t batch_end_ = 0;                 // last id of the ExecuteAll in progress
  std::map<uint64_t, nlohmann::json> early_;  // its replies that came before their turn
  uint64_t dropped_events_ = 0;
  uint64_t events_seen_ = 0;
  absl::Status broken_;  // non-OK once the stream cannot be trusted
};

}  // namespace vkick
