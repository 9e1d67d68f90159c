// Runs build/bin/vkickd as a child process for integration tests: reads the
// bound port from its "listening on http://..." log line, and always ends it
// (SIGTERM, then SIGKILL) when the test ends, also on failure.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace vkick::testing {

class VkickdProcess {
 public:
  ~VkickdProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (err_fd_ >= 0) ::close(err_fd_);
  }

  // Starts `binary args...`; `run_as` >= 0 drops to that uid/gid first.
  absl::Status Start(const std::string& binary, const std::vector<std::string>& args,
                     int run_as = -1) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return absl::InternalError("pipe");
    pid_ = ::fork();
    if (pid_ < 0) return absl::InternalError("fork");
    if (pid_ == 0) {
      ::dup2(p[1], STDERR_FILENO);
      if (run_as >= 0 && (::setgid(run_as) != 0 || ::setuid(run_as) != 0)) _exit(126);
      std::vector<char*> argv{const_cast<char*>(binary.c_str())};
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      // Tests never share the host's pins (/sys/fs/bpf/vkick, vkickd's
      // default): nothing pinned unless the test passes its own --pin-dir.
      static char no_pins[] = "--pin-dir=";
      if (!HasPinDir(args)) argv.push_back(no_pins);
      argv.push_back(nullptr);
      ::execv(binary.c_str(), argv.data());
      _exit(127);
    }
    ::close(p[1]);
    err_fd_ = p[0];
    return absl::OkStatus();
  }

  // Reads stderr until the listen line; returns the port.
  absl::StatusOr<int> WaitForListening(absl::Duration timeout = absl::Seconds(15)) {
    static const std::regex re("listening on http://127\\.0\\.0\\.1:([0-9]+)/metrics");
    absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      std::smatch m;
      if (std::regex_search(log_, m, re)) {
        int port = 0;
        if (absl::SimpleAtoi(m[1].str(), &port)) return port;
      }
      if (!ReadSome(deadline)) break;
    }
    return absl::DeadlineExceededError(absl::StrCat("vkickd did not start; stderr:\n", log_));
  }

  // Waits for exit (after a signal, or by itself); returns the exit status
  // as from waitpid, and collects the rest of stderr.
  absl::StatusOr<int> Wait(absl::Duration timeout = absl::Seconds(15)) {
    absl::Time deadline = absl::Now() + timeout;
    while (ReadSome(deadline)) {
    }
    while (absl::Now() < deadline) {
      int st = 0;
      pid_t r = ::waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return st;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return absl::DeadlineExceededError(absl::StrCat("vkickd did not exit; stderr:\n", log_));
  }

  // Reads stderr until it contains `text`; false after `timeout`.
  bool WaitForLog(const std::string& text, absl::Duration timeout = absl::Seconds(10)) {
    absl::Time deadline = absl::Now() + timeout;
    while (log_.find(text) == std::string::npos) {
      if (!ReadSome(deadline)) return false;
    }
    return true;
  }

  void Signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }
  const std::string& log() const { return log_; }

  static bool HasPinDir(const std::vector<std::string>& args) {
    for (const auto& a : args) {
      if (a.rfind("--pin-dir", 0) == 0 || a.rfind("--pin_dir", 0) == 0) return true;
    }
    return false;
  }

 private:
  // Appends available stderr; false at EOF or deadline.
  bool ReadSome(absl::Time deadline) {
    int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (ms <= 0) return false;
    pollfd pfd{err_fd_, POLLIN, 0};
    if (::poll(&pfd, 1, ms) <= 0) return false;
    char buf[4096];
    ssize_t n = ::read(err_fd_, buf, sizeof(buf));
    if (n <= 0) return false;
    log_.append(buf, n);
    return true;
  }

  pid_t pid_ = -1;
  int err_fd_ = -1;
  std::string log_;
};

// Runs `promtool check metrics` on `exposition`; returns its output and exit
// code. NotFound when promtool is not installed.
struct PromtoolResult {
  int exit_code = -1;
  std::string output;
};
inline absl::StatusOr<PromtoolResult> PromtoolCheckMetrics(const std::string& exposition) {
  if (::system("command -v promtool >/dev/null 2>&1") != 0) {
    return absl::NotFoundError("promtool is not installed (Debian package prometheus)");
  }
  char path[] = "/tmp/vkick-scrape-XXXXXX";
  int fd = ::mkstemp(path);
  if (fd < 0) return absl::InternalError("mkstemp");
  struct Unlink {
    const char* p;
    ~Unlink() { ::unlink(p); }
  } unlink_at_exit{path};
  if (::write(fd, exposition.data(), exposition.size()) !=
      static_cast<ssize_t>(exposition.size())) {
    ::close(fd);
    return absl::InternalError("write");
  }
  ::close(fd);
  std::string cmd = absl::StrCat("promtool check metrics < ", path, " 2>&1");
  FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return absl::InternalError("popen");
  PromtoolResult r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) r.output.append(buf, n);
  int st = ::pclose(f);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace vkick::testing
