#include "guest-policy/tool/driver_registry.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace vkick {
namespace {

// The registry path for the signal handler: a fixed buffer, because the
// handler may only call async-signal-safe functions (unlink, raise).
char g_registry_path[4096];
std::atomic<bool> g_registered{false};

void OnFatalSignal(int sig) {
  if (g_registered.load()) unlink(g_registry_path);
  signal(sig, SIG_DFL);
  raise(sig);
}

absl::Status MkdirP(const std::string& dir) {
  std::string cur;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || (dir[i] == '/' && i > 0)) {
      cur = dir.substr(0, i);
      if (mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) {
        return absl::ErrnoToStatus(errno, absl::StrCat("mkdir ", cur));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string DriverInfoJson(const DriverInfo& d) {
  nlohmann::json j;
  j["pid"] = d.pid;
  j["transport"] = d.transport;
  j["socket"] = d.socket;
  j["pci"] = d.pci;
  j["serial"] = d.serial;
  j["queues"] = d.queues;
  j["queue_size"] = d.queue_size;
  j["control_block"] = d.control_block;
  return j.dump() + "\n";
}

std::string SanitizeSerial(absl::string_view raw) {
  std::string out;
  for (char c : raw) {
    if (c == '\0' || out.size() == 20) break;
    if (c >= 0x20 && c <= 0x7e) out.push_back(c);
  }
  return out;
}

namespace {
bool SerialChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == ':' || c == '-';
}
}  // namespace

bool IsProtocolSerial(absl::string_view serial) {
  if (serial.size() > 20) return false;
  for (char c : serial) {
    if (!SerialChar(c)) return false;
  }
  return true;
}

std::string SerialFromSocketPath(absl::string_view path) {
  const size_t slash = path.rfind('/');
  absl::string_view base = slash == absl::string_view::npos ? path : path.substr(slash + 1);
  const size_t dot = base.rfind('.');
  if (dot != absl::string_view::npos && dot > 0) base = base.substr(0, dot);
  std::string out;
  for (char c : base) {
    if (c == '\0' || out.size() == 20) break;
    out.push_back(SerialChar(c) ? c : '_');
  }
  return out;
}

std::string ResolveRunDir(absl::string_view flag) {
  if (!flag.empty()) return std::string(flag);
  const char* env = std::getenv("VKICK_RUN_DIR");
  if (env != nullptr && env[0] != '\0') return env;
  return "/run/vkick";
}

std::string DefaultControlBlockPath(int pid) { return absl::StrCat("/dev/shm/vkick/control-", pid); }

absl::StatusOr<DriverRegistration> DriverRegistration::Create(const std::string& run_dir, const DriverInfo& d) {
  const std::string dir = run_dir + "/drivers";
  if (absl::Status st = MkdirP(dir); !st.ok()) return st;
  const std::string path = absl::StrCat(dir, "/", d.pid, ".json");
  const std::string tmp = absl::StrCat(dir, "/.", d.pid, ".json.tmp");
  if (path.size() >= sizeof(g_registry_path)) return absl::InvalidArgumentError("--run-dir path too long");
  const std::string body = DriverInfoJson(d);
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("create ", tmp));
  const ssize_t n = write(fd, body.data(), body.size());
  const int werr = errno;
  close(fd);
  if (n != static_cast<ssize_t>(body.size())) {
    unlink(tmp.c_str());
    return absl::ErrnoToStatus(n < 0 ? werr : EIO, absl::StrCat("write ", tmp));
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    unlink(tmp.c_str());
    return absl::ErrnoToStatus(e, absl::StrCat("rename to ", path));
  }
  std::memcpy(g_registry_path, path.c_str(), path.size() + 1);
  g_registered.store(true);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction sa {};
    sa.sa_handler = OnFatalSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, nullptr);
  }
  return DriverRegistration(path);
}

DriverRegistration::~DriverRegistration() {
  if (path_.empty()) return;
  g_registered.store(false);
  unlink(path_.c_str());
}

}  // namespace vkick
