// vhost-user kick labelling, end to end through the real tracepoints: a
// tracked child process announces a kick eventfd with a real
// VHOST_USER_SET_VRING_KICK message (sendmsg + SCM_RIGHTS), then kicks it
// with 8-byte write()s, exactly like QEMU's vCPU threads or a DPDK/SPDK-style
// frontend. The probes must count those writes per queue, exactly.
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <tuple>

#include "controller/probes/host_probes.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bpf/bpf_test_util.h"

namespace vkick {
namespace {

constexpr uint32_t kVmId = 9;
constexpr uint16_t kDevice = 3;

struct VhostUserMsg {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
  uint64_t payload;
} __attribute__((packed));

// Sends one vhost-user message, with `fd` in SCM_RIGHTS unless fd < 0.
bool SendVringKick(int sock, uint64_t payload, int fd, uint32_t size = 8) {
  VhostUserMsg m{12 /* SET_VRING_KICK */, 0x1 /* version */, size, payload};
  iovec iov{&m, sizeof(m)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  return sendmsg(sock, &msg, 0) == static_cast<ssize_t>(sizeof(m));
}

bool Kick(int efd, int times) {
  for (int i = 0; i < times; ++i) {
    uint64_t one = 1;
    if (write(efd, &one, sizeof(one)) != sizeof(one)) return false;
  }
  return true;
}

struct Fds {
  int declared[2] = {-1, -1};    // socket declared with SetVhostUserSocket
  int undeclared[2] = {-1, -1};  // socket the daemon does not know
  int kick_q1 = -1, kick_q0 = -1, kick_other = -1, unbound = -1;
  int go[2] = {-1, -1};
  ~Fds() {
    for (int fd : {declared[0], declared[1], undeclared[0], undeclared[1], kick_q1, kick_q0,
                   kick_other, unbound, go[0], go[1]}) {
      if (fd >= 0) close(fd);
    }
  }
};

TEST(VhostUserKickTest, CountsKickEventfdWritesPerQueue) {
  HostProbesOptions options = testing::NothingAttached();
  options.attach_vhost_user = true;
  VKICK_PROBES_OR_SKIP(p, options);

  Fds f;
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, f.declared), 0);
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, f.undeclared), 0);
  f.kick_q1 = eventfd(0, EFD_CLOEXEC);
  f.kick_q0 = eventfd(0, EFD_CLOEXEC);
  f.kick_other = eventfd(0, EFD_CLOEXEC);
  f.unbound = eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(f.unbound, 0);
  ASSERT_EQ(pipe2(f.go, O_CLOEXEC), 0);

  constexpr int kKicksQ1 = 37, kKicksQ0 = 11, kKicksOther = 5, kUnbound = 13;
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The "frontend". Wait until the parent tracks us, then talk.
    char c;
    if (read(f.go[0], &c, 1) != 1) _exit(10);
    bool ok = SendVringKick(f.declared[0], 1, f.kick_q1) &&          // queue 1
              SendVringKick(f.declared[0], 0, f.kick_q0) &&          // queue 0
              SendVringKick(f.declared[0], 2 | (1u << 8), -1) &&     // queue 2, NOFD: no binding
              SendVringKick(f.declared[0], 3, f.unbound, 4) &&       // size 4: malformed
              SendVringKick(f.undeclared[0], 5, f.kick_other) &&     // unknown device
              Kick(f.kick_q1, kKicksQ1) && Kick(f.kick_q0, kKicksQ0) &&
              Kick(f.kick_other, kKicksOther) && Kick(f.unbound, kUnbound);
    _exit(ok ? 0 : 11);
  }
  absl::Status s = p->TrackProcess(child, kVmId);
  if (s.ok()) s = p->SetVhostUserSocket(child, f.declared[0], kDevice);
  char go = 'g';
  const bool sent = s.ok() && write(f.go[1], &go, 1) == 1;
  if (!sent) kill(child, SIGKILL);
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "child status " << wstatus;

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  std::map<std::tuple<uint32_t, uint16_t, uint16_t>, uint64_t> counts;
  for (const NotificationCount& n : c->notifications) {
    counts[{n.vm_id, n.device_id, n.queue}] = n.count;
  }
  using Key = std::tuple<uint32_t, uint16_t, uint16_t>;
  EXPECT_THAT(counts, ::testing::UnorderedElementsAre(
                          ::testing::Pair(Key{kVmId, kDevice, 1}, kKicksQ1),
                          ::testing::Pair(Key{kVmId, kDevice, 0}, kKicksQ0),
                          ::testing::Pair(Key{kVmId, kUnknownDevice, 5}, kKicksOther)));
  EXPECT_EQ(c->errors.bad_vhost_msg, 1u);
  EXPECT_EQ(c->errors.read_user_failed, 0u);
  EXPECT_EQ(c->errors.map_full, 0u);

  std::map<int32_t, std::tuple<int32_t, uint16_t, uint16_t>> bindings;
  for (const KickFdBinding& b : c->kick_fds) {
    if (b.tgid == static_cast<uint32_t>(child)) {
      bindings[b.kick_fd] = {b.socket_fd, b.device_id, b.queue};
    }
  }
  using B = std::tuple<int32_t, uint16_t, uint16_t>;
  EXPECT_THAT(bindings, ::testing::UnorderedElementsAre(
                            ::testing::Pair(f.kick_q1, B{f.declared[0], kDevice, 1}),
                            ::testing::Pair(f.kick_q0, B{f.declared[0], kDevice, 0}),
                            ::testing::Pair(f.kick_other, B{f.undeclared[0], kUnknownDevice, 5})));

  // Declaring the other socket later labels its existing binding.
  ASSERT_TRUE(p->SetVhostUserSocket(child, f.undeclared[0], 4).ok());
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok());
  bool relabelled = false;
  for (const KickFdBinding& b : c->kick_fds) {
    if (b.kick_fd == f.kick_other && b.tgid == static_cast<uint32_t>(child)) {
      relabelled = b.device_id == 4 && b.queue == 5;
    }
  }
  EXPECT_TRUE(relabelled);

  ASSERT_TRUE(p->UntrackProcess(child, kVmId).ok());
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->kick_fds.empty());
  EXPECT_TRUE(c->notifications.empty());
}

}  // namespace
}  // namespace vkick
