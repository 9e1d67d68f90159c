#include "guest-policy/core/stats_block.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace vkick {

void InitStatsBlock(StatsBlock* b, uint16_t num_queues, uint64_t writer_pid) {
  std::memset(b, 0, sizeof(*b));
  b->version = kStatsBlockVersion;
  b->num_queues = std::min<uint16_t>(std::max<uint16_t>(num_queues, 1), kStatsBlockMaxQueues);
  b->size = sizeof(StatsBlock);
  b->writer_pid = writer_pid;
  std::atomic_ref<uint32_t>(b->magic).store(kStatsBlockMagic, std::memory_order_release);
}

absl::StatusOr<StatsView> ParseStatsBlock(const StatsBlock& copy, size_t bytes_read) {
  if (bytes_read < offsetof(StatsBlock, queues)) return absl::DataLossError("stats block: short header");
  if (copy.magic != kStatsBlockMagic) return absl::DataLossError("stats block: bad magic");
  if (copy.version != kStatsBlockVersion) {
    return absl::DataLossError(absl::StrCat("stats block: version ", copy.version, ", want ", kStatsBlockVersion));
  }
  if (copy.size != sizeof(StatsBlock) || bytes_read < sizeof(StatsBlock)) {
    return absl::DataLossError(absl::StrCat("stats block: size ", copy.size, " (", bytes_read, " read), want ",
                                            sizeof(StatsBlock)));
  }
  if (copy.num_queues == 0 || copy.num_queues > kStatsBlockMaxQueues) {
    return absl::DataLossError(absl::StrCat("stats block: ", copy.num_queues, " queues"));
  }
  return StatsView{copy.num_queues, copy.writer_pid, copy.queues};
}

absl::StatusOr<int> OpenStatsBlockFile(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(path, ": not a regular file"));
  }
  return fd;
}

absl::StatusOr<StatsView> ReadStatsBlock(int fd, StatsBlock* buf) {
  const ssize_t n = pread(fd, buf, sizeof(*buf), 0);
  if (n < 0) return absl::UnavailableError(absl::StrCat("stats block: ", std::strerror(errno)));
  return ParseStatsBlock(*buf, static_cast<size_t>(n));
}

absl::StatusOr<StatsView> ReadStatsBlockFile(const std::string& path, StatsBlock* buf) {
  absl::StatusOr<int> fd = OpenStatsBlockFile(path);
  if (!fd.ok()) return fd.status();
  absl::StatusOr<StatsView> v = ReadStatsBlock(*fd, buf);
  close(*fd);
  return v;
}

}  // namespace vkick
