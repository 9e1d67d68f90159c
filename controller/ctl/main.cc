// vkickctl: see controller/ctl/ctl.h and `vkickctl --help`.
#include <errno.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "common/flags.h"
#include "controller/ctl/ctl.h"

ABSL_FLAG(std::string, socket, vkick::kDefaultAdminSocket, "vkickd's admin socket.");
ABSL_FLAG(bool, json, false, "status: the reply as JSON instead of the table.");
ABSL_FLAG(bool, all, false, "policy set: every queue (replaces the default, clears the rest).");
ABSL_FLAG(std::string, vm, "", "policy: the VM (its vm label).");
ABSL_FLAG(std::string, device, "", "policy: the device (its device label); needs --vm.");
ABSL_FLAG(std::optional<int>, queue, std::nullopt, "policy: the queue index; needs --device.");
ABSL_FLAG(std::optional<int>, batch, std::nullopt, "policy set static: the batch B.");
ABSL_FLAG(std::optional<double>, defer_us, std::nullopt, "policy set static: the deferral bound T in us.");

namespace {

int Usage(const std::string& why) {
  std::fprintf(stderr, "vkickctl: %s\n\n%s", why.c_str(), vkick::CtlUsage().c_str());
  return 2;
}

vkick::CtlOptions OptionsFromFlags() {
  return {.socket = absl::GetFlag(FLAGS_socket),
          .json = absl::GetFlag(FLAGS_json),
          .all = absl::GetFlag(FLAGS_all),
          .vm = absl::GetFlag(FLAGS_vm),
          .device = absl::GetFlag(FLAGS_device),
          .queue = absl::GetFlag(FLAGS_queue),
          .batch = absl::GetFlag(FLAGS_batch),
          .defer_us = absl::GetFlag(FLAGS_defer_us)};
}

}  // namespace

int main(int argc, char** argv) {
  const vkick::CommandLine cl = vkick::ParseFlags(
      argc, argv, {.binary = "vkickctl", .usage = vkick::CtlUsage(), .flags_source = "controller/ctl/main.cc"});
  auto cmd = vkick::BuildCtlCommand(cl.positional, OptionsFromFlags());
  if (!cmd.ok()) return Usage(std::string(cmd.status().message()));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (cmd->socket.size() >= sizeof a.sun_path) return Usage("--socket path too long");
  std::memcpy(a.sun_path, cmd->socket.data(), cmd->socket.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    int e = errno;
    if (e == ENOENT || e == ECONNREFUSED) {
      std::fprintf(stderr, "vkickctl: vkickd is not running (no admin socket at %s)\n",
                   cmd->socket.c_str());
    } else if (e == EACCES || e == EPERM) {
      std::fprintf(stderr,
                   "vkickctl: permission denied on %s (root or vkickd's --admin-group only)\n",
                   cmd->socket.c_str());
    } else {
      std::fprintf(stderr, "vkickctl: cannot connect to %s: %s\n", cmd->socket.c_str(),
                   strerror(e));
    }
    return 2;
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string line = cmd->request.dump() + "\n";
  if (send(fd, line.data(), line.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    // vkickd may already have refused us and closed: read its reason below.
  }
  std::string reply;
  char buf[4096];
  while (reply.find('\n') == std::string::npos) {
    ssize_t r = read(fd, buf, sizeof buf);
    if (r <= 0) break;
    reply.append(buf, static_cast<size_t>(r));
    if (reply.size() > (16u << 20)) break;
  }
  close(fd);
  if (reply.empty()) {
    std::fprintf(stderr, "vkickctl: no reply from vkickd on %s\n", cmd->socket.c_str());
    return 2;
  }
  nlohmann::json j = nlohmann::json::parse(reply.substr(0, reply.find('\n')), nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::fprintf(stderr, "vkickctl: garbled reply from vkickd\n");
    return 2;
  }
  if (!j.value("ok", false)) {
    std::string err = j.value("error", std::string("unknown error"));
    std::fprintf(stderr, "vkickctl: %s\n", err.c_str());
    return err.rfind("permission denied", 0) == 0 ? 2 : 1;
  }
  if (cmd->is_status) {
    if (cmd->json_output) {
      std::printf("%s\n", j.dump(2).c_str());
    } else {
      std::fputs(vkick::FormatStatusTable(j).c_str(), stdout);
    }
  } else {
    std::printf("%s\n", j.value("message", std::string("ok")).c_str());
  }
  return 0;
}
