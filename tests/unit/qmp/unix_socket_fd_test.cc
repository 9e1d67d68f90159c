// fd resolution with real unix sockets: a listening socket in this process,
// a client in a forked child (so "which process holds which end" is real).
#include "controller/discovery/unix_socket_fd.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"

namespace vkick {
namespace {

constexpr int kChildFd = 77;

class UnixSocketFdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vkick-sockfd-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/vhost.sock";
  }
  void TearDown() override {
    if (child_ > 0) {
      ::kill(child_, SIGKILL);
      ::waitpid(child_, nullptr, 0);
    }
    for (int fd : fds_) ::close(fd);
    std::filesystem::remove_all(dir_);
  }

  int Listen() {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(::listen(fd, 4), 0);
    fds_.push_back(fd);
    return fd;
  }

  // Forks a child that connects to path_, moves the socket to kChildFd and
  // waits to be killed.
  void ForkClient() {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    child_ = ::fork();
    ASSERT_GE(child_, 0);
    if (child_ == 0) {
      int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un a = {};
      a.sun_family = AF_UNIX;
      std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) ::_exit(1);
      ::dup2(fd, kChildFd);
      ::close(fd);
      char c = 'r';
      (void)!::write(ready[1], &c, 1);
      for (;;) ::pause();
    }
    ::close(ready[1]);
    char c;
    ASSERT_EQ(::read(ready[0], &c, 1), 1);
    ::close(ready[0]);
  }

  std::string dir_;
  std::string path_;
  pid_t child_ = -1;
  std::vector<int> fds_;
};

TEST_F(UnixSocketFdTest, FindsTheClientsConnectionInAnotherProcess) {
  int listener = Listen();
  ForkClient();
  int accepted = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  ASSERT_GE(accepted, 0);
  fds_.push_back(accepted);

  // Client side (QEMU connecting to a vhost-user backend): the child's socket
  // has a peer whose name is the listening path.
  absl::StatusOr<int> fd = FindUnixSocketFd(child_, path_);
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_EQ(*fd, kChildFd);

  // Server side (chardev server=on): our accepted socket carries the path as
  // its own name; the listener (no peer) is not a connection.
  absl::StatusOr<int> mine = FindUnixSocketFd(::getpid(), path_);
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(*mine, accepted);

  EXPECT_EQ(FindUnixSocketFd(child_, dir_ + "/other.sock").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(UnixSocketFdTest, ListenerAloneIsNotAConnection) {
  Listen();
  EXPECT_EQ(FindUnixSocketFd(::getpid(), path_).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(UnixSocketFdTest, ProcessThatDoesNotExist) {
  EXPECT_FALSE(FindUnixSocketFd(0x7ffffff0, path_).ok());
}

TEST(MatchUnixSocketFd, PureMatching) {
  std::map<uint32_t, UnixSocketInfo> sockets = {
      {100, {"", 200}},            // client end, peer 200
      {200, {"/run/vu.sock", 100}},  // accepted end (named like the listener)
      {300, {"/run/other", 301}},
      {301, {"", 300}},
  };
  EXPECT_EQ(*MatchUnixSocketFd({{5, 301}, {9, 100}}, sockets, "/run/vu.sock"), 9);
  EXPECT_EQ(*MatchUnixSocketFd({{4, 200}}, sockets, "/run/vu.sock"), 4);
  EXPECT_FALSE(MatchUnixSocketFd({{5, 301}}, sockets, "/run/vu.sock").ok());
  EXPECT_FALSE(MatchUnixSocketFd({{5, 999}}, sockets, "/run/vu.sock").ok());
  EXPECT_FALSE(MatchUnixSocketFd({{9, 100}}, sockets, "").ok());
}

}  // namespace
}  // namespace vkick
