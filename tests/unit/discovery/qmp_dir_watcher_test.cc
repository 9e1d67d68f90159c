// --qmp-dir: the pure socket-set diff, and QmpDirWatcher with real inotify
// on a temp dir (sockets made with bind(); no root needed).
#include "controller/discovery/qmp_dir_watcher.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/temp_dir.h"

namespace vkick {

// Readable failures: "+/dir/a.sock", "-/dir/b.sock" (found by ADL).
void PrintTo(const QmpDirWatcher::Change& c, std::ostream* os) {
  *os << (c.kind == QmpDirWatcher::Change::kAdded ? "+" : "-") << c.path;
}

namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using testing::TempDir;
using Change = QmpDirWatcher::Change;
using Names = std::vector<std::string>;

Change Added(const std::string& path) { return {Change::kAdded, path}; }
Change Removed(const std::string& path) { return {Change::kRemoved, path}; }

// ---- DiffSocketSets (pure) ----

TEST(DiffSocketSets, FromNothingEverySocketIsAddedInNameOrder) {
  SocketSetDiff d = DiffSocketSets({}, {{"b.sock", 2}, {"a.sock", 1}}, 10);
  EXPECT_EQ(d.added, (Names{"a.sock", "b.sock"}));
  EXPECT_THAT(d.removed, IsEmpty());
  EXPECT_THAT(d.ignored, IsEmpty());
}

TEST(DiffSocketSets, SameNameSameInodeIsNoChange) {
  SocketSet s = {{"a", 1}, {"b", 2}};
  SocketSetDiff d = DiffSocketSets(s, s, 10);
  EXPECT_THAT(d.added, IsEmpty());
  EXPECT_THAT(d.removed, IsEmpty());
}

TEST(DiffSocketSets, GoneIsRemovedAndANewInodeIsRemovedThenAdded) {
  SocketSetDiff d = DiffSocketSets({{"a", 1}, {"b", 2}}, {{"b", 7}}, 10);
  EXPECT_EQ(d.removed, (Names{"a", "b"}));
  EXPECT_EQ(d.added, (Names{"b"}));  // a restarted QEMU at the same path
}

TEST(DiffSocketSets, TheBoundKeepsTrackedOnesAndIgnoresTheRestInNameOrder) {
  SocketSetDiff d = DiffSocketSets({{"z", 9}}, {{"a", 1}, {"b", 2}, {"c", 3}, {"z", 9}}, 3);
  EXPECT_THAT(d.removed, IsEmpty());
  EXPECT_EQ(d.added, (Names{"a", "b"}));  // z stays tracked, then the first names
  EXPECT_EQ(d.ignored, (Names{"c"}));
}

TEST(DiffSocketSets, ARemovalMakesRoomInTheSameDiff) {
  SocketSetDiff d = DiffSocketSets({{"a", 1}, {"b", 2}}, {{"b", 2}, {"c", 3}, {"d", 4}}, 2);
  EXPECT_EQ(d.removed, (Names{"a"}));
  EXPECT_EQ(d.added, (Names{"c"}));
  EXPECT_EQ(d.ignored, (Names{"d"}));
}

// What the watcher does on IN_Q_OVERFLOW: the events are lost, so the known
// set is diffed against a fresh scan. Nothing the lost events said is missed.
TEST(DiffSocketSets, OverflowRescanRecoversEveryLostEvent) {
  SocketSet known = {{"stays", 1}, {"deleted", 2}, {"restarted", 3}, {"renamed-from", 4}};
  SocketSet scan = {{"stays", 1}, {"restarted", 30}, {"renamed-to", 4}, {"created", 5}};
  SocketSetDiff d = DiffSocketSets(known, scan, QmpDirWatcher::kDefaultMaxSockets);
  EXPECT_EQ(d.removed, (Names{"deleted", "renamed-from", "restarted"}));
  EXPECT_EQ(d.added, (Names{"created", "renamed-to", "restarted"}));
  EXPECT_THAT(d.ignored, IsEmpty());
}

// ---- QmpDirWatcher (real inotify) ----

// A unix socket file at `path`, as QEMU's server=on chardev leaves one.
void MakeSocket(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof a.sun_path);
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << path;
  close(fd);  // the file stays
}

bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 1000) == 1;
}

// Drain() once the fd says there is something (inotify queues events at
// the syscall, so this does not wait in practice).
std::vector<Change> DrainReady(QmpDirWatcher& w) {
  EXPECT_TRUE(Readable(w.fd()));
  absl::StatusOr<std::vector<Change>> c = w.Drain();
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : std::vector<Change>{};
}

class QmpDirWatcherTest : public ::testing::Test {
 protected:
  std::unique_ptr<QmpDirWatcher> OpenWatcher(size_t max = QmpDirWatcher::kDefaultMaxSockets) {
    auto w = QmpDirWatcher::Open(dir_, max);
    EXPECT_TRUE(w.ok()) << w.status();
    return w.ok() ? *std::move(w) : nullptr;
  }
  std::string P(const std::string& name) const { return dir_ + "/" + name; }

  TempDir tmp_;
  const std::string dir_ = tmp_.path() + "/qmp";
  const std::string outside_ = tmp_.path() + "/outside";

  void SetUp() override {
    ASSERT_EQ(mkdir(dir_.c_str(), 0755), 0);
    ASSERT_EQ(mkdir(outside_.c_str(), 0755), 0);
  }
};

TEST_F(QmpDirWatcherTest, OpenRefusesAMissingDirOrAFileWithAClearMessage) {
  auto missing = QmpDirWatcher::Open(tmp_.path() + "/nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.status().message(), "QMP socket directory " + tmp_.path() +
                                            "/nope: No such file or directory (errno 2)");
  std::ofstream(P("file")) << "x";
  auto file = QmpDirWatcher::Open(P("file"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(file.status().message(), "QMP socket directory " + P("file") + " is not a directory");
  EXPECT_EQ(QmpDirWatcher::Open(dir_, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(QmpDirWatcherTest, TheFdIsNonBlockingAndCloseOnExec) {
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  EXPECT_TRUE(fcntl(w->fd(), F_GETFL) & O_NONBLOCK);
  EXPECT_TRUE(fcntl(w->fd(), F_GETFD) & FD_CLOEXEC);
}

TEST_F(QmpDirWatcherTest, FirstDrainReportsTheSocketsAlreadyThereSortedAndNothingElse) {
  MakeSocket(P("vm-b.sock"));
  MakeSocket(P("vm-a.sock"));
  MakeSocket(outside_ + "/target.sock");
  std::ofstream(P("notes.txt")) << "x";
  ASSERT_EQ(mkdir(P("subdir").c_str(), 0755), 0);
  ASSERT_EQ(symlink((outside_ + "/target.sock").c_str(), P("link.sock").c_str()), 0);
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  auto first = w->Drain();
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_THAT(*first, ElementsAre(Added(P("vm-a.sock")), Added(P("vm-b.sock"))));
  auto second = w->Drain();
  ASSERT_TRUE(second.ok());
  EXPECT_THAT(*second, IsEmpty());
  EXPECT_EQ(w->tracked(), 2u);
}

TEST_F(QmpDirWatcherTest, ASocketCreatedThenRemovedIsAddedThenRemoved) {
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  MakeSocket(P("vm1.sock"));
  EXPECT_THAT(DrainReady(*w), ElementsAre(Added(P("vm1.sock"))));
  ASSERT_EQ(unlink(P("vm1.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("vm1.sock"))));
  EXPECT_EQ(w->tracked(), 0u);
}

TEST_F(QmpDirWatcherTest, RegularFilesDirectoriesAndSymlinksAreIgnored) {
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  MakeSocket(outside_ + "/target.sock");
  std::ofstream(P("vm.sock.tmp")) << "x";
  ASSERT_EQ(mkdir(P("d").c_str(), 0755), 0);
  ASSERT_EQ(symlink((outside_ + "/target.sock").c_str(), P("link.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), IsEmpty());
  ASSERT_EQ(unlink(P("vm.sock.tmp").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), IsEmpty());
}

TEST_F(QmpDirWatcherTest, RenamesInOutAndWithinTheDirectory) {
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  MakeSocket(outside_ + "/vm.sock");
  ASSERT_EQ(rename((outside_ + "/vm.sock").c_str(), P("vm.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Added(P("vm.sock"))));
  ASSERT_EQ(rename(P("vm.sock").c_str(), P("vm2.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("vm.sock")), Added(P("vm2.sock"))));
  ASSERT_EQ(rename(P("vm2.sock").c_str(), (outside_ + "/vm2.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("vm2.sock"))));
}

TEST_F(QmpDirWatcherTest, ASocketReplacedAtTheSamePathIsRemovedThenAdded) {
  MakeSocket(P("vm.sock"));
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  // A restarted QEMU: the old file removed, a new socket bound at the path.
  ASSERT_EQ(unlink(P("vm.sock").c_str()), 0);
  MakeSocket(P("vm.sock"));
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("vm.sock")), Added(P("vm.sock"))));
  // rename() over it: no delete event for the old one, only the new inode says it.
  MakeSocket(outside_ + "/new.sock");
  ASSERT_EQ(rename((outside_ + "/new.sock").c_str(), P("vm.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("vm.sock")), Added(P("vm.sock"))));
  EXPECT_EQ(w->tracked(), 1u);
}

TEST_F(QmpDirWatcherTest, BeyondTheBoundSocketsAreCountedAndTakenInWhenRoomIsMade) {
  MakeSocket(P("a.sock"));
  MakeSocket(P("b.sock"));
  MakeSocket(P("c.sock"));
  auto w = OpenWatcher(/*max=*/2);
  ASSERT_NE(w, nullptr);
  auto first = w->Drain();
  ASSERT_TRUE(first.ok());
  EXPECT_THAT(*first, ElementsAre(Added(P("a.sock")), Added(P("b.sock"))));
  EXPECT_EQ(w->ignored(), 1u);
  MakeSocket(P("d.sock"));
  EXPECT_THAT(DrainReady(*w), IsEmpty());
  EXPECT_EQ(w->ignored(), 2u);
  ASSERT_EQ(unlink(P("a.sock").c_str()), 0);
  EXPECT_THAT(DrainReady(*w), ElementsAre(Removed(P("a.sock")), Added(P("c.sock"))));
  EXPECT_EQ(w->tracked(), 2u);
  EXPECT_EQ(w->ignored(), 1u);
  ASSERT_EQ(unlink(P("d.sock").c_str()), 0);  // an ignored one leaves: no change to report
  EXPECT_THAT(DrainReady(*w), IsEmpty());
  EXPECT_EQ(w->ignored(), 0u);
}

TEST_F(QmpDirWatcherTest, TheDirectoryRemovedIsAnErrorFromThenOn) {
  MakeSocket(P("vm.sock"));
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  std::filesystem::remove_all(dir_);
  ASSERT_TRUE(Readable(w->fd()));
  auto gone = w->Drain();
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
  EXPECT_NE(gone.status().message().find(dir_), absl::string_view::npos);
  EXPECT_EQ(w->Drain().status().code(), absl::StatusCode::kNotFound);  // sticky
}

TEST_F(QmpDirWatcherTest, TheDirectoryMovedAwayIsAnErrorToo) {
  auto w = OpenWatcher();
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(w->Drain().ok());
  ASSERT_EQ(rename(dir_.c_str(), (tmp_.path() + "/moved").c_str()), 0);
  ASSERT_TRUE(Readable(w->fd()));
  EXPECT_EQ(w->Drain().status().code(), absl::StatusCode::kNotFound);
}

TEST_F(QmpDirWatcherTest, PathsAreDirSlashNameEvenWithATrailingSlash) {
  MakeSocket(P("vm.sock"));
  auto w = QmpDirWatcher::Open(dir_ + "//");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->dir(), dir_);
  auto c = (*w)->Drain();
  ASSERT_TRUE(c.ok());
  EXPECT_THAT(*c, ElementsAre(Added(dir_ + "/vm.sock")));
}

}  // namespace
}  // namespace vkick
