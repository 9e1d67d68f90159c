// vkickd --qmp-dir as a process (label integration): the real vkickd
// (--no-probes, loopback HTTP) watching a temp directory in which real QEMU
// 7.2 processes create their QMP monitor socket, the way docs/operations.md
// ("Discovering VMs from a directory") tells libvirt users to add one:
// -chardev socket,path=DIR/NAME.sock,server=on,wait=off -mon mode=control.
// A VM there before vkickd starts and one started later are attached (their
// vkick_vm_info and queue series are scraped); a QEMU that exits cleanly
// removes its socket and its series go; regular files and symbolic links in
// the directory are ignored. Only the processes started here are ended, by pid.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/daemon/vkickd_process.h"
#include "tests/unit/exporters/http_get.h"
#include "tests/unit/temp_dir.h"

extern char** environ;

namespace vkick {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using testing::HttpGet;
using testing::TempDir;
using testing::VkickdProcess;

// How long a change in the directory may take to show on /metrics: inotify,
// the attachment (QEMU's socket is bound a moment before it listens) and a
// control tick (200ms here). Generous for a loaded CI host.
constexpr absl::Duration kDeadline = absl::Seconds(10);

std::string FindQemu() {
  for (const char* dir : {"/usr/bin", "/usr/local/bin"}) {
    std::string p = std::string(dir) + "/qemu-system-x86_64";
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

bool IsSocket(const std::string& path) {
  struct stat st{};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

// One tiny QEMU: q35 under TCG, stopped (-S), one virtio-blk disk with two
// queues on a null block device, and its QMP monitor at `socket`. Killed
// (SIGKILL, by pid) when the object goes unless it was stopped before.
class Qemu {
 public:
  Qemu() = default;
  Qemu(const Qemu&) = delete;
  Qemu& operator=(const Qemu&) = delete;
  ~Qemu() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  // stdout and stderr go to `log`.
  bool Start(const std::string& qemu, const std::string& name, const std::string& socket,
             const std::string& log) {
    log_ = log;
    std::vector<std::string> args = {
        qemu, "-name", name, "-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
        "-display", "none", "-S",
        "-blockdev", "driver=null-co,node-name=n0",
        "-device", "virtio-blk-pci,drive=n0,id=disk0,num-queues=2",
        "-chardev", "socket,id=vkick-qmp,path=" + socket + ",server=on,wait=off",
        "-mon", "chardev=vkick-qmp,mode=control"};
    std::vector<char*> argv;
    for (std::string& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
    int rc = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) pid_ = -1;
    return rc == 0;
  }

  // Waits for the monitor socket to exist; false (QEMU's output in `why`)
  // if QEMU exited first or `timeout` passed.
  bool WaitForSocket(const std::string& socket, std::string* why,
                     absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (IsSocket(socket)) return true;
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        *why = absl::StrCat("QEMU exited (status ", st, "): ", Log());
        return false;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    *why = absl::StrCat("no socket ", socket, " after ", absl::FormatDuration(timeout), ": ",
                        Log());
    return false;
  }

  // SIGTERM and wait: QEMU exits normally (and removes its socket). Returns
  // the wait status, or -1 if it did not exit in time (then it is killed by
  // the destructor).
  int Terminate(absl::Duration timeout = absl::Seconds(10)) {
    ::kill(pid_, SIGTERM);
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return st;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return -1;
  }

  pid_t pid() const { return pid_; }

  std::string Log() const {
    std::string out;
    if (FILE* f = std::fopen(log_.c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
      std::fclose(f);
    }
    return out;
  }

 private:
  pid_t pid_ = -1;
  std::string log_;
};

// The sample lines of an exposition (no # HELP / # TYPE) that contain `needle`.
std::vector<std::string> Lines(const std::string& body, const std::string& needle = "") {
  std::vector<std::string> out;
  for (absl::string_view l : absl::StrSplit(body, '\n', absl::SkipEmpty())) {
    if (absl::StartsWith(l, "#")) continue;
    if (absl::StrContains(l, needle)) out.emplace_back(l);
  }
  return out;
}

// Every value of label `label` on any series.
std::set<std::string> LabelValues(const std::string& body, const std::string& label) {
  std::set<std::string> out;
  const std::regex re("[{,]" + label + "=\"([^\"]*)\"");
  for (const std::string& l : Lines(body)) {
    for (auto it = std::sregex_iterator(l.begin(), l.end(), re); it != std::sregex_iterator();
         ++it) {
      out.insert((*it)[1].str());
    }
  }
  return out;
}

// The `vm` label of every vkick_vm_info series.
std::set<std::string> VmInfoNames(const std::string& body) {
  std::set<std::string> out;
  const std::regex re("^vkick_vm_info\\{vm=\"([^\"]*)\"");
  for (const std::string& l : Lines(body, "vkick_vm_info{")) {
    std::smatch m;
    if (std::regex_search(l, m, re)) out.insert(m[1].str());
  }
  return out;
}

class VkickdQmpDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    qemu_ = FindQemu();
    if (qemu_.empty()) {
      GTEST_SKIP() << "qemu-system-x86_64 is not installed (/usr/bin or /usr/local/bin): "
                      "these tests run real QEMU VMs";
    }
    ASSERT_FALSE(dir_.path().empty()) << "mkdtemp failed";
    ASSERT_FALSE(aux_.path().empty()) << "mkdtemp failed";
    // sun_path holds 108 bytes; a long TMPDIR would make QEMU fail to bind.
    ASSERT_LT(Sock("vm-after").size(), 100u) << "TMPDIR too long for a unix socket path";
  }

  std::string Sock(const std::string& name) const { return dir_.path() + "/" + name + ".sock"; }

  // Starts QEMU `name` with its monitor at DIR/NAME.sock and waits for the
  // socket to exist.
  void StartVm(Qemu& q, const std::string& name) {
    ASSERT_TRUE(q.Start(qemu_, name, Sock(name), aux_.path() + "/" + name + ".log"));
    std::string why;
    ASSERT_TRUE(q.WaitForSocket(Sock(name), &why)) << why;
  }

  // vkickd without probes, admin socket or persistent state outside `aux_`,
  // watching `dir_`; a 200ms control loop so /metrics follows quickly. The
  // refresh interval stays at its default (10s): attaching and dropping must
  // follow the directory, not the periodic re-read.
  void StartVkickd() {
    ASSERT_TRUE(vk_.Start(VKICKD_BINARY, {"--no-probes", "--qmp-dir=" + dir_.path(),
                                          "--listen=127.0.0.1:0", "--control-interval=200ms",
                                          "--departed-retention=1s",
                                          "--admin-socket=", "--state-dir=" + aux_.path()})
                    .ok());
    auto port = vk_.WaitForListening();
    ASSERT_TRUE(port.ok()) << port.status();
    port_ = *port;
  }

  // Reads what vkickd has written to stderr so far into vk_.log().
  void DrainLog() { vk_.WaitForLog("\x01 never logged", absl::Milliseconds(200)); }

  std::string Scrape() {
    auto m = HttpGet(port_, "/metrics");
    if (!m.ok() || m->code != 200) {
      ADD_FAILURE() << "scrape failed: " << (m.ok() ? absl::StrCat(m->code) : m.status().ToString());
      return "";
    }
    return m->body;
  }

  // Scrapes until `pred(body)` holds or kDeadline passes; returns the last
  // scrape, and whether it held in `*ok`.
  template <typename Pred>
  std::string ScrapeUntil(Pred pred, bool* ok) {
    const absl::Time deadline = absl::Now() + kDeadline;
    std::string body;
    for (;;) {
      body = Scrape();
      if (pred(body)) {
        *ok = true;
        return body;
      }
      if (absl::Now() >= deadline) break;
      absl::SleepFor(absl::Milliseconds(100));
    }
    *ok = false;
    return body;
  }

  // What an attached VM `vm` (monitor at `sock`) shows: its info, its
  // connection, and both queues of disk0.
  static void ExpectAttached(const std::string& body, const std::string& vm,
                             const std::string& sock, pid_t pid) {
    EXPECT_THAT(body, HasSubstr(absl::StrCat("vkick_vm_info{vm=\"", vm, "\",pid=\"", pid,
                                             "\"} 1\n")));
    EXPECT_THAT(body, HasSubstr(absl::StrCat("vkick_qmp_connected{qmp=\"", sock, "\"} 1\n")));
    for (const char* q : {"0", "1"}) {
      EXPECT_THAT(body, HasSubstr(absl::StrCat("vkick_virtqueue_notifications_total{vm=\"", vm,
                                               "\",device=\"disk0\",queue=\"", q, "\"} ")));
      EXPECT_THAT(body, HasSubstr(absl::StrCat("vkick_queue_policy_info{vm=\"", vm,
                                               "\",device=\"disk0\",queue=\"", q, "\",")));
    }
  }

  static bool HasVm(const std::string& body, const std::string& vm) {
    return absl::StrContains(body, absl::StrCat("vkick_vm_info{vm=\"", vm, "\""));
  }

  std::string qemu_;
  TempDir dir_{"vkick-qmpdir"};   // the watched directory
  TempDir aux_{"vkick-qmpdir-aux"};  // QEMU logs, --state-dir
  // Declared after the directories: ended before they are removed.
  Qemu before_, after_;
  VkickdProcess vk_;  // ended first
  int port_ = 0;
};

// 1, 2 and 5: a VM whose socket is there at start and one started later are
// both attached, with their queues; the start-up log names the directory.
TEST_F(VkickdQmpDirTest, AttachesVmsPresentAtStartAndStartedLater) {
  ASSERT_NO_FATAL_FAILURE(StartVm(before_, "vm-before"));
  ASSERT_NO_FATAL_FAILURE(StartVkickd());

  EXPECT_THAT(vk_.log(), HasSubstr(absl::StrCat("every socket in directory ", dir_.path())))
      << "the start-up line names the watched directory";

  bool ok = false;
  std::string body = ScrapeUntil([](const std::string& b) { return HasVm(b, "vm-before"); }, &ok);
  ASSERT_TRUE(ok) << "vm-before not attached within " << kDeadline << "\n--- log:\n"
                  << vk_.log() << "\n--- scrape:\n" << body;
  // The queues come with the same discovery: complete in the first scrape
  // that has the VM.
  ExpectAttached(body, "vm-before", Sock("vm-before"), before_.pid());

  const absl::Time started = absl::Now();
  ASSERT_NO_FATAL_FAILURE(StartVm(after_, "vm-after"));
  body = ScrapeUntil([](const std::string& b) { return HasVm(b, "vm-after"); }, &ok);
  ASSERT_TRUE(ok) << "vm-after not attached within " << kDeadline << "\n--- log:\n"
                  << vk_.log() << "\n--- scrape:\n" << body;
  const absl::Duration took = absl::Now() - started;
  ExpectAttached(body, "vm-after", Sock("vm-after"), after_.pid());
  ExpectAttached(body, "vm-before", Sock("vm-before"), before_.pid());
  EXPECT_EQ(VmInfoNames(body), (std::set<std::string>{"vm-after", "vm-before"}));
  // Well under the 10s refresh interval: the directory event did it.
  EXPECT_LT(took, absl::Seconds(5)) << "vm-after took " << took << " to show";

  EXPECT_TRUE(vk_.WaitForLog(absl::StrCat("qmp ", Sock("vm-after"), ": attached VM 'vm-after'"),
                             absl::Seconds(2)))
      << vk_.log();

  vk_.Signal(SIGTERM);
  auto st = vk_.Wait();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << vk_.log();
}

// 3: QEMU exiting normally (SIGTERM) removes its socket; its series go from
// /metrics, and stay gone, while the other VM stays attached.
TEST_F(VkickdQmpDirTest, DropsAVmWhoseQemuExitsAndKeepsTheOther) {
  ASSERT_NO_FATAL_FAILURE(StartVm(before_, "vm-before"));
  ASSERT_NO_FATAL_FAILURE(StartVkickd());
  ASSERT_NO_FATAL_FAILURE(StartVm(after_, "vm-after"));
  bool ok = false;
  std::string body = ScrapeUntil(
      [](const std::string& b) { return HasVm(b, "vm-before") && HasVm(b, "vm-after"); }, &ok);
  ASSERT_TRUE(ok) << vk_.log() << "\n--- scrape:\n" << body;
  ASSERT_THAT(Lines(body, Sock("vm-after")), Not(IsEmpty()));

  const std::string gone = Sock("vm-after");
  const int st = after_.Terminate();
  ASSERT_NE(st, -1) << "QEMU did not exit on SIGTERM";
  EXPECT_TRUE(WIFEXITED(st) || WIFSIGNALED(st)) << st;
  // The premise of dropping on a clean exit: QEMU removed its socket.
  errno = 0;
  EXPECT_NE(::access(gone.c_str(), F_OK), 0) << gone << " still there after QEMU exited";
  EXPECT_EQ(errno, ENOENT);

  const absl::Time exited = absl::Now();
  auto dropped = [&](const std::string& b) {
    return !b.empty() && Lines(b, "vm=\"vm-after\"").empty() &&
           Lines(b, absl::StrCat("\"", gone, "\"")).empty();
  };
  body = ScrapeUntil(dropped, &ok);
  EXPECT_TRUE(ok) << "vm-after's series still there after " << kDeadline << ":\n"
                  << absl::StrJoin(Lines(body, "vm-after"), "\n") << "\n--- log:\n"
                  << vk_.log();
  EXPECT_LT(absl::Now() - exited, absl::Seconds(5));
  ExpectAttached(body, "vm-before", Sock("vm-before"), before_.pid());
  EXPECT_EQ(VmInfoNames(body), std::set<std::string>{"vm-before"});

  // Not back after a few control ticks and QMP retry rounds (no reconnect
  // to the removed path: no connect-error series for it either).
  absl::SleepFor(absl::Milliseconds(1500));
  body = Scrape();
  EXPECT_TRUE(dropped(body)) << absl::StrJoin(Lines(body, "vm-after"), "\n") << "\n--- log:\n"
                             << vk_.log();
  ExpectAttached(body, "vm-before", Sock("vm-before"), before_.pid());
  EXPECT_EQ(LabelValues(body, "qmp"), std::set<std::string>{Sock("vm-before")});

  EXPECT_TRUE(vk_.WaitForLog(absl::StrCat("qmp ", gone, ": detached VM 'vm-after'"),
                             absl::Seconds(2)))
      << vk_.log();
}

// 4: a regular file and a symbolic link to vm-before's socket, both already
// there at start (the initial scan) and both created while vkickd runs
// (inotify), are no VM and no QMP target: no vkick_vm_info, no
// vkick_qmp_connected and no vkick_qmp_errors_total series names them.
TEST_F(VkickdQmpDirTest, IgnoresRegularFilesAndSymlinks) {
  ASSERT_NO_FATAL_FAILURE(StartVm(before_, "vm-before"));
  const std::string file1 = dir_.path() + "/file-at-start.sock";
  const std::string link1 = dir_.path() + "/link-at-start.sock";
  const std::string file2 = dir_.path() + "/file-later.sock";
  const std::string link2 = dir_.path() + "/link-later.sock";
  {
    FILE* f = std::fopen(file1.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("not a socket\n", f);
    std::fclose(f);
  }
  ASSERT_EQ(::symlink(Sock("vm-before").c_str(), link1.c_str()), 0);  // absolute target
  ASSERT_TRUE(IsSocket(Sock("vm-before")));

  ASSERT_NO_FATAL_FAILURE(StartVkickd());
  bool ok = false;
  std::string body = ScrapeUntil([](const std::string& b) { return HasVm(b, "vm-before"); }, &ok);
  ASSERT_TRUE(ok) << vk_.log() << "\n--- scrape:\n" << body;

  {
    FILE* f = std::fopen(file2.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("not a socket either\n", f);
    std::fclose(f);
  }
  ASSERT_EQ(::symlink("vm-before.sock", link2.c_str()), 0);  // relative target
  // A real socket after them: once it is attached, vkickd has read the
  // directory events of the file and the link before it.
  ASSERT_NO_FATAL_FAILURE(StartVm(after_, "vm-after"));
  body = ScrapeUntil([](const std::string& b) { return HasVm(b, "vm-after"); }, &ok);
  ASSERT_TRUE(ok) << vk_.log() << "\n--- scrape:\n" << body;
  // And a few control ticks more for anything that would come late.
  absl::SleepFor(absl::Milliseconds(1000));
  body = Scrape();

  EXPECT_EQ(VmInfoNames(body), (std::set<std::string>{"vm-after", "vm-before"}))
      << "no extra VM";
  EXPECT_EQ(Lines(body, "vkick_vm_info{").size(), 2u);
  EXPECT_EQ(LabelValues(body, "qmp"),
            (std::set<std::string>{Sock("vm-after"), Sock("vm-before")}))
      << "only the two real sockets are QMP targets";
  DrainLog();
  for (const std::string& p : {file1, link1, file2, link2}) {
    EXPECT_THAT(Lines(body, p), IsEmpty()) << p;
    EXPECT_THAT(vk_.log(), Not(HasSubstr(p))) << "the log mentions " << p;
  }
  // The link's target still has its one client (vkickd by its real path).
  ExpectAttached(body, "vm-before", Sock("vm-before"), before_.pid());
  ExpectAttached(body, "vm-after", Sock("vm-after"), after_.pid());
  // Not checked: that the real sockets' error counters are 0. A socket
  // appears at QEMU's bind(), a moment before its listen(), and vkickd
  // counts a connect error when it connects in between (it then retries).
}

}  // namespace
}  // namespace vkick
