#include "guest-policy/tool/driver_registry.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
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
char g_stats_path[4096];  // empty: none
std::atomic<bool> g_registered{false};

void OnFatalSignal(int sig) {
  if (g_registered.load()) {
    unlink(g_registry_path);
    if (g_stats_path[0] != '\0') unlink(g_stats_path);
  }
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
  if (!d.stats_block.empty()) j["stats_block"] = d.stats_block;
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
std::string StatsBlockPathBeside(absl::string_view control_path, int pid) {
  const size_t slash = control_path.rfind('/');
  const absl::string_view dir = slash == absl::string_view::npos ? "." : control_path.substr(0, slash);
  return absl::StrCat(dir, "/stats-", pid);
}

absl::StatusOr<StatsFile> StatsFile::Create(const std::string& path, uint16_t num_queues) {
  const size_t slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    if (absl::Status st = MkdirP(path.substr(0, slash)); !st.ok()) return st;
  }
  unlink(path.c_str());  // a dead driver's leftover of our pid: never reuse its counters
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("create ", path));
  if (ftruncate(fd, sizeof(StatsBlock)) != 0) {
    const int e = errno;
    close(fd);
    unlink(path.c_str());
    return absl::ErrnoToStatus(e, absl::StrCat("size ", path));
  }
  void* p = mmap(nullptr, sizeof(StatsBlock), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    unlink(path.c_str());
    return absl::ErrnoToStatus(e, absl::StrCat("map ", path));
  }
  auto* b = static_cast<StatsBlock*>(p);
  InitStatsBlock(b, num_queues, static_cast<uint64_t>(getpid()));
  return StatsFile(path, b);
}

StatsFile::~StatsFile() {
  if (block_ == nullptr) return;
  unlink(path_.c_str());
  munmap(block_, sizeof(StatsBlock));
}

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
  if (d.stats_block.size() < sizeof(g_stats_path)) std::memcpy(g_stats_path, d.stats_block.c_str(), d.stats_block.size() + 1);
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
