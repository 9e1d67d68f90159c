// vhost-user kick labelling, end to end through the real tracepoints: a
// tracked child process announces a kick eventfd with a real
// VHOST_USER_SET_VRING_KICK message (sendmsg + SCM_RIGHTS), then kicks it
// with 8-byte write()s, exactly like QEMU's vCPU threads or a DPDK/SPDK-style
// frontend. The probes must count those writes per queue, exactly.
#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
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

// A listening unix socket at `path` (connect() succeeds from the backlog).
int Listen(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), path.size());
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd, 8) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

// The child side of ConnectStartsTracking: connect to `path` (addrlen
// `len`, as real programs pass either sizeof(sockaddr_un) or the exact
// length), announce two kick fds over that connection and kick them.
int ConnectAndKick(const std::string& path, bool exact_len, int go, int q0_kicks, int q1_kicks) {
  char c;
  if (read(go, &c, 1) != 1) return 10;
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), path.size());
  socklen_t len = exact_len ? static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size())
                            : sizeof(a);
  if (s < 0 || connect(s, reinterpret_cast<sockaddr*>(&a), len) != 0) return 11;
  int k0 = eventfd(0, EFD_CLOEXEC), k1 = eventfd(0, EFD_CLOEXEC);
  if (!SendVringKick(s, 0, k0) || !SendVringKick(s, 1, k1)) return 12;
  if (!Kick(k0, q0_kicks) || !Kick(k1, q1_kicks)) return 13;
  return 0;
}

// A frontend is tracked from its connect() to a declared vhost-user socket
// path: nobody calls TrackProcess, yet its SET_VRING_KICK messages and
// kick writes are counted per queue under the path's {vm, device}. A
// process connecting to another path is not tracked. When the frontend
// exits it is dropped (the exit program, then the sweep of its bindings);
// the device's counters stay.
TEST(VhostUserKickTest, ConnectToDeclaredPathStartsTracking) {
  HostProbesOptions options = testing::NothingAttached();
  options.attach_vhost_user = true;
  VKICK_PROBES_OR_SKIP(p, options);

  char tmpl[] = "/tmp/vkick-connect-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  char* real = realpath(tmpl, nullptr);
  ASSERT_NE(real, nullptr);
  const std::string dir = real;
  free(real);
  const std::string declared = dir + "/vhost.sock", other = dir + "/other.sock";
  int l1 = Listen(declared), l2 = Listen(other);
  ASSERT_GE(l1, 0);
  ASSERT_GE(l2, 0);
  ASSERT_TRUE(p->SetVhostUserPath(declared, kVmId, kDevice).ok());
  EXPECT_FALSE(p->SetVhostUserPath("relative.sock", kVmId, kDevice).ok());

  int go[2];
  ASSERT_EQ(pipe2(go, O_CLOEXEC), 0);
  constexpr int kQ0 = 23, kQ1 = 7, kOther = 9;
  // Two frontends of the declared path (one passes the exact addrlen, one
  // sizeof(sockaddr_un)) and one of another path.
  pid_t a = fork();
  if (a == 0) _exit(ConnectAndKick(declared, /*exact_len=*/true, go[0], kQ0, kQ1));
  pid_t b = fork();
  if (b == 0) _exit(ConnectAndKick(declared, /*exact_len=*/false, go[0], 1, 2));
  pid_t o = fork();
  if (o == 0) _exit(ConnectAndKick(other, /*exact_len=*/false, go[0], kOther, kOther));
  ASSERT_GT(a, 0);
  ASSERT_GT(b, 0);
  ASSERT_GT(o, 0);
  ASSERT_EQ(write(go[1], "ggg", 3), 3);
  for (pid_t c : {a, b, o}) {
    int st = 0;
    ASSERT_EQ(waitpid(c, &st, 0), c);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "child " << c << " status " << st;
  }
  close(go[0]);
  close(go[1]);

  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok()) << c.status();
  std::map<std::tuple<uint32_t, uint16_t, uint16_t>, uint64_t> counts;
  for (const NotificationCount& n : c->notifications) {
    counts[{n.vm_id, n.device_id, n.queue}] = n.count;
  }
  using Key = std::tuple<uint32_t, uint16_t, uint16_t>;
  EXPECT_THAT(counts, ::testing::UnorderedElementsAre(
                          ::testing::Pair(Key{kVmId, kDevice, 0}, kQ0 + 1),
                          ::testing::Pair(Key{kVmId, kDevice, 1}, kQ1 + 2)));
  EXPECT_EQ(c->errors.map_full, 0u);
  EXPECT_EQ(c->errors.bad_vhost_msg, 0u);
  // All three exited: the exit program dropped the two frontends (the
  // third was never one).
  EXPECT_TRUE(c->frontends.empty());
  // Their bindings were learned (they outlive the process until swept).
  size_t bound = 0;
  for (const KickFdBinding& k : c->kick_fds) {
    EXPECT_TRUE(k.tgid == static_cast<uint32_t>(a) || k.tgid == static_cast<uint32_t>(b));
    EXPECT_EQ(k.device_id, kDevice);
    ++bound;
  }
  EXPECT_EQ(bound, 4u);
  ASSERT_TRUE(p->SweepExitedFrontends().ok());
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->kick_fds.empty());
  EXPECT_EQ(c->notifications.size(), 2u);  // the device's counters stay

  close(l1);
  close(l2);
  unlink(declared.c_str());
  unlink(other.c_str());
  rmdir(dir.c_str());
}

// A frontend connected before vkickd declared its path is adopted with
// TrackFrontend (vkickd finds it with sock_diag): counted from then on,
// dropped when it exits.
TEST(VhostUserKickTest, AdoptedFrontendIsCountedAndDroppedAtExit) {
  HostProbesOptions options = testing::NothingAttached();
  options.attach_vhost_user = true;
  VKICK_PROBES_OR_SKIP(p, options);
  Fds f;
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, f.declared), 0);
  f.kick_q0 = eventfd(0, EFD_CLOEXEC);
  ASSERT_EQ(pipe2(f.go, O_CLOEXEC), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    char c;
    if (read(f.go[0], &c, 1) != 1) _exit(10);
    _exit(SendVringKick(f.declared[0], 0, f.kick_q0) && Kick(f.kick_q0, 5) ? 0 : 11);
  }
  absl::Status s = p->TrackFrontend(child, f.declared[0], kVmId, kDevice);
  const bool sent = s.ok() && write(f.go[1], "g", 1) == 1;
  if (!sent) kill(child, SIGKILL);
  int st = 0;
  ASSERT_EQ(waitpid(child, &st, 0), child);
  ASSERT_TRUE(s.ok()) << s;
  auto c = p->ReadCounters();
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(c->notifications.size(), 1u);
  EXPECT_EQ(c->notifications[0].count, 5u);
  EXPECT_TRUE(c->frontends.empty());  // dropped at exit
  ASSERT_TRUE(p->SweepExitedFrontends().ok());
  c = p->ReadCounters();
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->kick_fds.empty());
}

}  // namespace
}  // namespace vkick
