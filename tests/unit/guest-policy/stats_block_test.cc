// The driver's stats block (guest-policy/core/stats_block.h): the reader's
// validation of a copy (ParseStatsBlock) and of a file (ReadStatsBlockFile),
// on real files in a temp dir. The bucket functions' agreement with the
// protocol is checked in tests/unit/agent (which links both).
#include "tests/unit/temp_dir.h"
#include "guest-policy/core/stats_block.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "gtest/gtest.h"

namespace vkick {
namespace {

struct TempDir : vkick::testing::TempDir {
  TempDir() : vkick::testing::TempDir("vkick-stats-block-test") {}
};

// A heap block (5 KiB) initialised as a driver would.
std::unique_ptr<StatsBlock> Block(uint16_t queues = 2, uint64_t pid = 4242) {
  auto b = std::make_unique<StatsBlock>();
  InitStatsBlock(b.get(), queues, pid);
  return b;
}

void WriteFile(const std::string& path, const void* data, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (n) {
    ASSERT_EQ(std::fwrite(data, n, 1, f), 1u);
  }
  std::fclose(f);
}

TEST(StatsBlock, InitWritesAValidHeader) {
  auto b = Block(3, 77);
  EXPECT_EQ(b->magic, kStatsBlockMagic);
  EXPECT_EQ(b->version, kStatsBlockVersion);
  EXPECT_EQ(b->num_queues, 3);
  EXPECT_EQ(b->size, sizeof(StatsBlock));
  EXPECT_EQ(b->writer_pid, 77u);
  EXPECT_EQ(b->queues[0].requests, 0u);
  EXPECT_EQ(b->queues[0].depth_limit, 0u);
  // Out-of-range queue counts are clamped into what a reader accepts.
  InitStatsBlock(b.get(), 0, 1);
  EXPECT_EQ(b->num_queues, 1);
  InitStatsBlock(b.get(), 100, 1);
  EXPECT_EQ(b->num_queues, kStatsBlockMaxQueues);
}

TEST(StatsBlock, InitZeroesEveryCounter) {
  auto b = Block();
  b->queues[1].requests = 99;
  b->queues[15].latency_hist[15] = 5;
  InitStatsBlock(b.get(), 2, 1);
  EXPECT_EQ(b->queues[1].requests, 0u);
  EXPECT_EQ(b->queues[15].latency_hist[15], 0u);
}

TEST(StatsBlock, StatsAddAccumulates) {
  uint64_t c = 0;
  StatsAdd(c, 1);
  StatsAdd(c, 41);
  EXPECT_EQ(c, 42u);
}

TEST(ParseStatsBlock, AcceptsAValidBlock) {
  auto b = Block(2, 4242);
  b->queues[1].asks = 7;
  auto v = ParseStatsBlock(*b, sizeof(StatsBlock));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->num_queues, 2);
  EXPECT_EQ(v->writer_pid, 4242u);
  ASSERT_NE(v->queues, nullptr);
  EXPECT_EQ(v->queues, b->queues) << "points into the validated copy";
  EXPECT_EQ(v->queues[1].asks, 7u);
  EXPECT_TRUE(ParseStatsBlock(*Block(kStatsBlockMaxQueues), sizeof(StatsBlock)).ok());
  EXPECT_TRUE(ParseStatsBlock(*Block(1), sizeof(StatsBlock)).ok());
}

TEST(ParseStatsBlock, RejectsShortReads) {
  auto b = Block();
  for (size_t n : {size_t{0}, size_t{1}, offsetof(StatsBlock, queues) - 1, offsetof(StatsBlock, queues),
                   sizeof(StatsBlock) - 1}) {
    auto v = ParseStatsBlock(*b, n);
    EXPECT_FALSE(v.ok()) << n << " bytes read";
    EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << n;
  }
}

TEST(ParseStatsBlock, RejectsABadHeader) {
  struct Case {
    const char* what;
    void (*mutate)(StatsBlock*);
  } cases[] = {
      {"bad magic", [](StatsBlock* b) { b->magic = 0x12345678; }},
      {"zero magic", [](StatsBlock* b) { b->magic = 0; }},
      {"version 0", [](StatsBlock* b) { b->version = 0; }},
      {"version 2", [](StatsBlock* b) { b->version = kStatsBlockVersion + 1; }},
      {"size smaller", [](StatsBlock* b) { b->size = sizeof(StatsBlock) - 8; }},
      {"size larger", [](StatsBlock* b) { b->size = sizeof(StatsBlock) + 8; }},
      {"size 0", [](StatsBlock* b) { b->size = 0; }},
      {"0 queues", [](StatsBlock* b) { b->num_queues = 0; }},
      {"17 queues", [](StatsBlock* b) { b->num_queues = kStatsBlockMaxQueues + 1; }},
      {"65535 queues", [](StatsBlock* b) { b->num_queues = 0xffff; }},
  };
  for (const Case& c : cases) {
    auto b = Block();
    c.mutate(b.get());
    auto v = ParseStatsBlock(*b, sizeof(StatsBlock));
    EXPECT_FALSE(v.ok()) << c.what;
    EXPECT_EQ(v.status().code(), absl::StatusCode::kDataLoss) << c.what;
  }
}

TEST(ReadStatsBlockFile, ReadsBackWhatWasWritten) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats-4242";
  auto b = Block(2, 4242);
  b->queues[0].requests = 100;
  b->queues[0].completions = 99;
  b->queues[0].asks = 40;
  b->queues[0].suppressed = 30;
  b->queues[0].depth_hist[3] = 100;
  b->queues[1].latency_hist[15] = 5;
  b->queues[1].kicks_by_why[7] = 3;
  WriteFile(path, b.get(), sizeof(StatsBlock));
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(path, &buf);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->num_queues, 2);
  EXPECT_EQ(v->writer_pid, 4242u);
  EXPECT_EQ(v->queues, buf.queues);
  EXPECT_EQ(std::memcmp(&buf, b.get(), sizeof(StatsBlock)), 0) << "the copy is the file, byte for byte";
  EXPECT_EQ(v->queues[0].suppressed, 30u);
  EXPECT_EQ(v->queues[1].kicks_by_why[7], 3u);
}

TEST(ReadStatsBlockFile, AMissingFileIsNotFound) {
  TempDir tmp;
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(tmp.path() + "/none", &buf);
  EXPECT_EQ(v.status().code(), absl::StatusCode::kNotFound);
}

TEST(ReadStatsBlockFile, AFifoIsRefusedWithoutBlocking) {
  TempDir tmp;
  const std::string path = tmp.path() + "/fifo";
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
  StatsBlock buf{};
  auto v = ReadStatsBlockFile(path, &buf);  // no writer: a blocking open would hang here
  EXPECT_FALSE(v.ok());
}

TEST(ReadStatsBlockFile, ADirectoryIsRefused) {
  TempDir tmp;
  StatsBlock buf{};
  EXPECT_FALSE(ReadStatsBlockFile(tmp.path(), &buf).ok());
  EXPECT_FALSE(ReadStatsBlockFile("/dev/null", &buf).ok()) << "a character device";
}

TEST(ReadStatsBlockFile, ASymlinkIsNotFollowed) {
  TempDir tmp;
  const std::string target = tmp.path() + "/real";
  const std::string link = tmp.path() + "/link";
  auto b = Block();
  WriteFile(target, b.get(), sizeof(StatsBlock));
  ASSERT_EQ(symlink(target.c_str(), link.c_str()), 0);
  StatsBlock buf{};
  ASSERT_TRUE(ReadStatsBlockFile(target, &buf).ok());
  EXPECT_FALSE(ReadStatsBlockFile(link, &buf).ok()) << "O_NOFOLLOW: a registry entry must not point root elsewhere";
}

TEST(ReadStatsBlockFile, ATruncatedFileIsRefused) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  auto b = Block();
  StatsBlock buf{};
  for (size_t n : {size_t{0}, size_t{10}, offsetof(StatsBlock, queues), sizeof(StatsBlock) - 1}) {
    WriteFile(path, b.get(), n);
    auto v = ReadStatsBlockFile(path, &buf);
    EXPECT_FALSE(v.ok()) << n << " bytes";
  }
}

// The reader reuses its buffer: a valid block read before must not make a
// later, shorter file look valid (the tail of the buffer is stale).
TEST(ReadStatsBlockFile, AStaleBufferDoesNotValidateAShortFile) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  auto b = Block();
  WriteFile(path, b.get(), sizeof(StatsBlock));
  StatsBlock buf{};
  ASSERT_TRUE(ReadStatsBlockFile(path, &buf).ok());
  WriteFile(path, b.get(), offsetof(StatsBlock, queues));  // the header alone, valid
  EXPECT_FALSE(ReadStatsBlockFile(path, &buf).ok());
  WriteFile(path, b.get(), 0);
  EXPECT_FALSE(ReadStatsBlockFile(path, &buf).ok());
}

TEST(ReadStatsBlock, AKeptFdSeesUpdatesAndTheFinalCountersAfterRemoval) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  auto b = Block(1, 7);
  WriteFile(path, b.get(), sizeof(StatsBlock));
  auto fd = OpenStatsBlockFile(path);
  ASSERT_TRUE(fd.ok()) << fd.status();
  StatsBlock buf{};
  ASSERT_TRUE(ReadStatsBlock(*fd, &buf).ok());
  b->queues[0].requests = 33;
  const int w = open(path.c_str(), O_WRONLY);
  ASSERT_GE(w, 0);
  ASSERT_EQ(pwrite(w, b.get(), sizeof(StatsBlock), 0), static_cast<ssize_t>(sizeof(StatsBlock)));
  close(w);
  ASSERT_EQ(unlink(path.c_str()), 0);
  auto v = ReadStatsBlock(*fd, &buf);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->queues[0].requests, 33u);
  close(*fd);
}

TEST(OpenStatsBlockFile, RefusesWhatIsNotARegularFile) {
  TempDir tmp;
  const std::string fifo = tmp.path() + "/fifo", link = tmp.path() + "/link", real = tmp.path() + "/real";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  auto b = Block();
  WriteFile(real, b.get(), sizeof(StatsBlock));
  ASSERT_EQ(symlink(real.c_str(), link.c_str()), 0);
  EXPECT_FALSE(OpenStatsBlockFile(fifo).ok());
  EXPECT_FALSE(OpenStatsBlockFile(link).ok());
  EXPECT_FALSE(OpenStatsBlockFile(tmp.path()).ok());
  EXPECT_EQ(OpenStatsBlockFile(tmp.path() + "/none").status().code(), absl::StatusCode::kNotFound);
  auto fd = OpenStatsBlockFile(real);
  ASSERT_TRUE(fd.ok());
  close(*fd);
}

TEST(ReadStatsBlock, ABadFdIsAnErrorNotACrash) {
  StatsBlock buf{};
  EXPECT_FALSE(ReadStatsBlock(-1, &buf).ok());
}

TEST(ReadStatsBlockFile, ALongerFileIsReadUpToTheBlock) {
  TempDir tmp;
  const std::string path = tmp.path() + "/stats";
  std::string bytes(sizeof(StatsBlock) + 100, 'x');
  auto b = Block();
  std::memcpy(bytes.data(), b.get(), sizeof(StatsBlock));
  WriteFile(path, bytes.data(), bytes.size());
  StatsBlock buf{};
  EXPECT_TRUE(ReadStatsBlockFile(path, &buf).ok());
}

}  // namespace
}  // namespace vkick
