// QmpDirWatcher with a real QEMU 7.2 (label integration): the second monitor
// docs/operations.md tells libvirt users to add (-chardev socket + -mon
// mode=control) appears in the watched directory, serves QMP, and QEMU
// removes the socket when it quits; a killed QEMU leaves it behind.
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "controller/discovery/qmp_dir_watcher.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/temp_dir.h"

extern char** environ;

namespace vkick {
namespace {

using ::testing::ElementsAre;
using Change = QmpDirWatcher::Change;

std::string FindQemu() {
  for (const char* dir : {"/usr/bin", "/usr/local/bin"}) {
    std::string p = std::string(dir) + "/qemu-system-x86_64";
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

// Changes until `want` of them arrived or `timeout` passed.
std::vector<Change> WaitForChanges(QmpDirWatcher& w, size_t want,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  std::vector<Change> got;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (got.size() < want && std::chrono::steady_clock::now() < deadline) {
    pollfd p{w.fd(), POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    absl::StatusOr<std::vector<Change>> c = w.Drain();
    if (!c.ok()) break;
    got.insert(got.end(), c->begin(), c->end());
  }
  return got;
}

// Reads from `fd` until `needle` shows up (or 5 s pass).
bool ReadUntil(int fd, const std::string& needle) {
  std::string buf;
  char chunk[4096];
  for (int i = 0; i < 50 && buf.find(needle) == std::string::npos; ++i) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    ssize_t n = read(fd, chunk, sizeof chunk);
    if (n <= 0) break;
    buf.append(chunk, static_cast<size_t>(n));
  }
  return buf.find(needle) != std::string::npos;
}

// The socket shows up at QEMU's bind(), a moment before its listen():
// connect() is refused until then (what the watcher's header warns about).
int ConnectWithRetry(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  for (int i = 0; i < 100; ++i) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
    close(fd);
    usleep(10000);
  }
  return -1;
}

// Greeting, capabilities, then quit: QEMU exits normally.
void QuitOverQmp(const std::string& path) {
  int fd = ConnectWithRetry(path);
  ASSERT_GE(fd, 0) << path;
  EXPECT_TRUE(ReadUntil(fd, "\"QMP\""));
  const std::string caps = "{\"execute\":\"qmp_capabilities\"}\n";
  ASSERT_EQ(write(fd, caps.data(), caps.size()), static_cast<ssize_t>(caps.size()));
  EXPECT_TRUE(ReadUntil(fd, "\"return\""));
  const std::string quit = "{\"execute\":\"quit\"}\n";
  ASSERT_EQ(write(fd, quit.data(), quit.size()), static_cast<ssize_t>(quit.size()));
  // QEMU drops queued commands of a client that hangs up: wait for the answer.
  EXPECT_TRUE(ReadUntil(fd, "\"SHUTDOWN\""));
  close(fd);
}

class QmpDirWatcherLiveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    qemu_ = FindQemu();
    if (qemu_.empty()) GTEST_SKIP() << "qemu-system-x86_64 not installed";
  }
  void TearDown() override {
    if (pid_ > 0) {  // only the QEMU this test started, by pid
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // QEMU with nothing but the monitor docs/operations.md prescribes.
  void StartQemu(const std::string& socket_path) {
    std::vector<std::string> args = {
        qemu_, "-machine", "none", "-nodefaults", "-display", "none", "-S",
        "-chardev", "socket,id=vkick-qmp,path=" + socket_path + ",server=on,wait=off",
        "-mon", "chardev=vkick-qmp,mode=control"};
    std::vector<char*> argv;
    for (std::string& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    ASSERT_EQ(posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ), 0);
  }
  bool Exited(int timeout_ms) {
    for (int i = 0; i < timeout_ms / 10; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return true;
      }
      usleep(10000);
    }
    return false;
  }

  std::string qemu_;
  pid_t pid_ = -1;
  testing::TempDir dir_;
};

TEST_F(QmpDirWatcherLiveTest, AMonitorAppearsServesQmpAndGoesWhenQemuQuits) {
  auto w = QmpDirWatcher::Open(dir_.path());
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Drain().ok());
  const std::string sock = dir_.path() + "/vm1.sock";
  StartQemu(sock);
  EXPECT_THAT(WaitForChanges(**w, 1), ElementsAre(Change{Change::kAdded, sock}));
  QuitOverQmp(sock);
  ASSERT_TRUE(Exited(10000));
  EXPECT_THAT(WaitForChanges(**w, 1), ElementsAre(Change{Change::kRemoved, sock}));
}

TEST_F(QmpDirWatcherLiveTest, AKilledQemuLeavesItsSocketBehind) {
  auto w = QmpDirWatcher::Open(dir_.path());
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Drain().ok());
  const std::string sock = dir_.path() + "/vm1.sock";
  StartQemu(sock);
  ASSERT_EQ(WaitForChanges(**w, 1).size(), 1u);
  kill(pid_, SIGKILL);
  ASSERT_TRUE(Exited(10000));
  // Still "there": stale until someone removes it.
  EXPECT_TRUE(WaitForChanges(**w, 1, std::chrono::milliseconds(500)).empty());
  EXPECT_EQ(access(sock.c_str(), F_OK), 0);
  EXPECT_EQ((*w)->tracked(), 1u);
}

}  // namespace
}  // namespace vkick
