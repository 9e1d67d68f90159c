// Reading the probes' BPF hash maps from userspace: every entry of a map,
// per-CPU values summed over the CPUs.
//
// vkickd reads every counter map at every control tick. A key walk costs two
// syscalls per key (get_next_key, then lookup): with a fleet's keys (4096 VMs
// x 9 queue keys, plus the exit keys) that is tens of thousands of syscalls a
// tick. BPF_MAP_LOOKUP_BATCH (Linux 5.6) returns a chunk of keys and values
// per syscall; MapReader uses it and falls back to the walk on older kernels.
#pragma once

#include <bpf/bpf.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace vkick {

// errno (or libbpf's -errno) -> Status for the probes' BPF calls: the
// common mapping (common/errno_status.h; EPERM/EACCES say root is needed),
// except that E2BIG, a full map, is kResourceExhausted.
absl::Status ProbeErrnoStatus(int err, absl::string_view what);

// Calls fn(key) for every key of a hash map, by get_next_key. Keys are
// collected first so fn may delete them.
template <typename Key, typename Fn>
absl::Status ForEachKey(int fd, absl::string_view map_name, Fn fn) {
  std::vector<Key> keys;
  Key key{};
  Key next{};
  const Key* prev = nullptr;
  while (bpf_map_get_next_key(fd, prev, &next) == 0) {
    keys.push_back(next);
    key = next;
    prev = &key;
  }
  if (errno != ENOENT) return ProbeErrnoStatus(errno, absl::StrCat("iterating map ", map_name));
  for (const Key& k : keys) fn(k);
  return absl::OkStatus();
}

// How a map's values are handed out: as stored, or (per-CPU maps) summed
// over the possible CPUs.
struct PlainValues {};
struct PerCpuSum {};
inline constexpr PlainValues kPlainValues;
inline constexpr PerCpuSum kPerCpuSum;

class MapReader {
 public:
  // Keys per BPF_MAP_LOOKUP_BATCH: 64 syscalls for 16384 keys, and a
  // 512 KiB value buffer for per-CPU u64 counters on a 256-CPU host.
  static constexpr uint32_t kChunkKeys = 256;

  explicit MapReader(int num_cpus, uint32_t chunk_keys = kChunkKeys)
      : num_cpus_(num_cpus), chunk_keys_(chunk_keys) {}

  // Calls fn(key, value) for every entry of hash map `fd` (`name` for
  // errors). With kPerCpuSum, Value is an unsigned integer and fn gets its
  // sum over the CPUs. Entries added or removed meanwhile may or may not be
  // seen, as with a walk.
  template <typename Key, typename Value, typename Values, typename Fn>
  absl::Status ForEach(int fd, absl::string_view name, Values values, Fn fn);

  // Calls fn(index, value) for indices 0..n-1 of array map `fd` (n at most
  // its max_entries): batches of consecutive indices, or one lookup each
  // where the kernel has no batch ops. For the counter slots, which are
  // handed out lowest first: only the part in use is read.
  template <typename Value, typename Values, typename Fn>
  absl::Status ForEachIndex(int fd, absl::string_view name, uint32_t n, Values values, Fn fn);

  // One entry; false when it is absent or unreadable (errno says which).
  template <typename Value, typename Values>
  bool Lookup(int fd, const void* key, Values values, Value* out) const;

  // Whether reads go by batch: false until a read has found out.
  bool batched() const { return mode_ == Mode::kBatch; }
  // Walk keys from now on: for tests, and to measure what batching saves.
  void ForceKeyWalk() { mode_ = Mode::kKeyWalk; }

 private:
  enum class Mode { kUntried, kBatch, kKeyWalk };

  // Bytes of one key's value: per-CPU maps store one round_up(size, 8) slot
  // per possible CPU.
  template <typename Value, typename Values>
  size_t ValueBytes() const {
    if constexpr (std::is_same_v<Values, PerCpuSum>) {
      static_assert(std::is_unsigned_v<Value>, "per-CPU values are summed: unsigned integers");
      return (sizeof(Value) + 7) / 8 * 8 * static_cast<size_t>(num_cpus_);
    } else {
      return sizeof(Value);
    }
  }
  template <typename Value, typename Values>
  Value Decode(const unsigned char* p) const;
  template <typename Key, typename Value, typename Values, typename Fn>
  absl::Status ForEachBatched(int fd, absl::string_view name, Fn& fn);

  int num_cpus_;
  uint32_t chunk_keys_;
  Mode mode_ = Mode::kUntried;
};

template <typename Value, typename Values>
Value MapReader::Decode(const unsigned char* p) const {
  Value v{};
  if constexpr (std::is_same_v<Values, PerCpuSum>) {
    constexpr size_t kSlot = (sizeof(Value) + 7) / 8 * 8;
    for (int cpu = 0; cpu < num_cpus_; ++cpu, p += kSlot) {
      Value one;
      std::memcpy(&one, p, sizeof(one));
      v += one;
    }
  } else {
    std::memcpy(&v, p, sizeof(v));
  }
  return v;
}

template <typename Value, typename Values>
bool MapReader::Lookup(int fd, const void* key, Values, Value* out) const {
  std::vector<unsigned char> buf(ValueBytes<Value, Values>());
  if (bpf_map_lookup_elem(fd, key, buf.data()) != 0) return false;
  *out = Decode<Value, Values>(buf.data());
  return true;
}

template <typename Key, typename Value, typename Values, typename Fn>
absl::Status MapReader::ForEach(int fd, absl::string_view name, Values, Fn fn) {
  if (mode_ != Mode::kKeyWalk) {
    absl::Status s = ForEachBatched<Key, Value, Values>(fd, name, fn);
    if (mode_ != Mode::kKeyWalk) return s;  // else the kernel refused batches: walk
  }
  std::vector<unsigned char> buf(ValueBytes<Value, Values>());
  return ForEachKey<Key>(fd, name, [&](const Key& k) {
    // A key deleted since the walk saw it is skipped, like a batch would.
    if (bpf_map_lookup_elem(fd, &k, buf.data()) == 0) fn(k, Decode<Value, Values>(buf.data()));
  });
}

template <typename Value, typename Values, typename Fn>
absl::Status MapReader::ForEachIndex(int fd, absl::string_view name, uint32_t n, Values,
                                     Fn fn) {
  const size_t value_bytes = ValueBytes<Value, Values>();
  uint32_t done = 0;
  if (mode_ != Mode::kKeyWalk && n > 0) {
    std::vector<uint32_t> keys(chunk_keys_);
    std::vector<unsigned char> vals(chunk_keys_ * value_bytes);
    uint32_t token = 0;
    void* in = nullptr;  // from index 0; then after the last one read
    while (done < n) {
      uint32_t count = std::min(chunk_keys_, n - done);
      const int err = bpf_map_lookup_batch(fd, in, &token, keys.data(), vals.data(), &count,
                                           nullptr) ? errno : 0;
      if (err != 0 && err != ENOENT) {
        if (mode_ == Mode::kUntried && (err == EINVAL || err == EOPNOTSUPP || err == ENOTSUP)) {
          mode_ = Mode::kKeyWalk;  // as ForEachBatched: decided once
          break;
        }
        return ProbeErrnoStatus(err, absl::StrCat("batch-reading map ", name));
      }
      mode_ = Mode::kBatch;
      for (uint32_t i = 0; i < count; ++i) fn(keys[i], Decode<Value, Values>(&vals[i * value_bytes]));
      done += count;
      if (err == ENOENT || count == 0) return absl::OkStatus();  // the array's end
      in = &token;
    }
    if (mode_ == Mode::kBatch) return absl::OkStatus();
  }
  std::vector<unsigned char> buf(value_bytes);
  for (uint32_t i = done; i < n; ++i) {
    if (bpf_map_lookup_elem(fd, &i, buf.data()) != 0) {
      return ProbeErrnoStatus(errno, absl::StrCat("reading map ", name, " index ", i));
    }
    fn(i, Decode<Value, Values>(buf.data()));
  }
  return absl::OkStatus();
}

template <typename Key, typename Value, typename Values, typename Fn>
absl::Status MapReader::ForEachBatched(int fd, absl::string_view name, Fn& fn) {
  // Hash maps resume from a 4-byte bucket index; others from a key.
  static_assert(sizeof(Key) >= 4, "the batch token must hold a bucket index");
  const size_t value_bytes = ValueBytes<Value, Values>();
  uint32_t chunk = chunk_keys_;
  std::vector<Key> keys(chunk);
  std::vector<unsigned char> vals(chunk * value_bytes);
  Key token{};
  void* in = nullptr;  // from the start
  while (true) {
    uint32_t n = chunk;
    const int err = bpf_map_lookup_batch(fd, in, &token, keys.data(), vals.data(), &n, nullptr)
                        ? errno : 0;
    if (err != 0 && err != ENOENT && err != ENOSPC) {
      // Kernels before 5.6 do not know the command (EINVAL), and a map type
      // without batch ops says EOPNOTSUPP. Decided once, at the first call:
      // afterwards the same errno is a real failure, not a missing feature.
      if (mode_ == Mode::kUntried && (err == EINVAL || err == EOPNOTSUPP || err == ENOTSUP)) {
        mode_ = Mode::kKeyWalk;
        return absl::OkStatus();
      }
      return ProbeErrnoStatus(err, absl::StrCat("batch-reading map ", name));
    }
    mode_ = Mode::kBatch;
    for (uint32_t i = 0; i < n; ++i) fn(keys[i], Decode<Value, Values>(&vals[i * value_bytes]));
    if (err == ENOENT) return absl::OkStatus();  // the last chunk (libbpf: end of the map)
    in = &token;
    // ENOSPC: a hash bucket holds more keys than a chunk, and the kernel
    // never splits a bucket. Retry it with room for twice as many.
    if (err == ENOSPC && n == 0) {
      chunk *= 2;
      keys.resize(chunk);
      vals.resize(chunk * value_bytes);
    }
  }
}

}  // namespace vkick
