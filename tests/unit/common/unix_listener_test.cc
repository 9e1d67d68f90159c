// ListenUnix on a temp dir, unprivileged: modes, the stale/live/non-socket
// rules, parent directory creation, chgrp (and its refusal), cleanup on error.
#include "common/unix_listener.h"

#include <fcntl.h>
#include <grp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/unit/temp_dir.h"

namespace vkick {
namespace {

using testing::TempDir;

bool Exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

mode_t ModeOf(const std::string& path) {
  struct stat st{};
  lstat(path.c_str(), &st);
  return st.st_mode;
}

// A connected client fd, or -1.
int Connect(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST(ListenUnix, ListensNonBlockingCloexecWithTheModeAskedAndLeavesTheUmaskAlone) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  mode_t before = umask(022);
  UnixListenOptions o;
  o.mode = 0660;
  absl::StatusOr<UniqueFd> fd = ListenUnix(path, o);
  EXPECT_EQ(umask(before), 022u);
  ASSERT_TRUE(fd.ok()) << fd.status();
  EXPECT_TRUE(S_ISSOCK(ModeOf(path)));
  EXPECT_EQ(ModeOf(path) & 0777, 0660u);
  EXPECT_TRUE(fcntl(fd->get(), F_GETFL) & O_NONBLOCK);
  EXPECT_TRUE(fcntl(fd->get(), F_GETFD) & FD_CLOEXEC);
  int c = Connect(path);
  ASSERT_GE(c, 0);
  int a = accept4(fd->get(), nullptr, nullptr, SOCK_CLOEXEC);
  EXPECT_GE(a, 0);
  close(a);
  close(c);
}

TEST(ListenUnix, DefaultModeIsOwnerOnly) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  ASSERT_TRUE(ListenUnix(path, {}).ok());
  EXPECT_EQ(ModeOf(path) & 0777, 0600u);
}

TEST(ListenUnix, AnEmptyOrTooLongPathIsInvalidAndNamesTheFlag) {
  UnixListenOptions o;
  o.flag = "--agent-socket";
  absl::Status empty = ListenUnix("", o).status();
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(empty.message(),
            "--agent-socket: bad unix socket path '' (empty, or longer than 107 bytes)");
  EXPECT_EQ(ListenUnix("/" + std::string(107, 'x'), o).status().code(),
            absl::StatusCode::kInvalidArgument);
  // 107 bytes fit sun_path with its NUL: past the check, bind() fails on the directory.
  const std::string longest = "/nonexistent-dir/" + std::string(107 - 17, 'x');
  ASSERT_EQ(longest.size(), 107u);
  EXPECT_EQ(ListenUnix(longest, o).status().code(), absl::StatusCode::kNotFound);
}

TEST(ListenUnix, AFileThatIsNotASocketIsRefusedAndKept) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  std::ofstream(path) << "data";
  absl::Status s = ListenUnix(path, {}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(S_ISREG(ModeOf(path)));
}

TEST(ListenUnix, RefusesALiveListenerAndReplacesAStaleSocket) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  absl::StatusOr<UniqueFd> first = ListenUnix(path, {});
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(ListenUnix(path, {}).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(Exists(path));  // the live one is untouched
  first->Reset();             // a killed daemon: the file stays, nobody listens
  ASSERT_TRUE(Exists(path));
  absl::StatusOr<UniqueFd> second = ListenUnix(path, {});
  ASSERT_TRUE(second.ok()) << second.status();
  int c = Connect(path);
  EXPECT_GE(c, 0);
  close(c);
}

TEST(ListenUnix, CreatesTheParentDirectoryOnlyWhenAsked) {
  TempDir dir;
  const std::string path = dir.path() + "/run/s.sock";
  absl::Status s = ListenUnix(path, {}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("bind " + path), absl::string_view::npos) << s;
  UnixListenOptions o;
  o.create_parent_dir = true;
  ASSERT_TRUE(ListenUnix(path, o).ok());
  EXPECT_TRUE(S_ISDIR(ModeOf(dir.path() + "/run")));
}

TEST(ListenUnix, GivesTheSocketToTheGroup) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  UnixListenOptions o;
  o.mode = 0660;
  o.group = getegid();  // a group we are in: allowed without privileges
  ASSERT_TRUE(ListenUnix(path, o).ok());
  struct stat st{};
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_gid, getegid());
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

// 0 when a chgrp to root's group is refused as it should be, else which check failed.
int RefusedChgrpCheck(const std::string& path) {
  UnixListenOptions o;
  o.group = 0;  // root's group: not ours
  o.group_hint = "join the group";
  absl::Status s = ListenUnix(path, o).status();
  if (s.code() != absl::StatusCode::kPermissionDenied) return 1;
  if (s.message().find("chgrp " + path + " to gid 0") == absl::string_view::npos) return 2;
  if (s.message().find("join the group") == absl::string_view::npos) return 3;
  return Exists(path) ? 4 : 0;
}

TEST(ListenUnix, ARefusedChgrpSaysHowToFixItAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.path() + "/s.sock";
  if (geteuid() != 0) {
    EXPECT_EQ(RefusedChgrpCheck(path), 0);
    return;
  }
  // Root may chgrp to any group: check as nobody in a child.
  chmod(dir.path().c_str(), 0777);
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 ||
        setresuid(65534, 65534, 65534) != 0)
      _exit(10);
    _exit(RefusedChgrpCheck(path));
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "failed check (10: could not become nobody)";
}

TEST(UniqueFd, ReleaseHandsTheFdOverWithoutClosingIt) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  int raw;
  {
    UniqueFd owner(fds[0]);
    raw = owner.Release();
    EXPECT_FALSE(owner.valid());
  }
  EXPECT_EQ(fcntl(raw, F_GETFD), 0);  // still open
  close(raw);
  close(fds[1]);
}

}  // namespace
}  // namespace vkick
