#include "agent/registry.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace vkick::agent {
namespace {

using Json = nlohmann::json;

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(what); }

bool GetString(const Json& j, const char* key, size_t max_len, std::string* out) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) return false;
  const std::string& s = it->get_ref<const std::string&>();
  if (s.size() > max_len) return false;
  for (unsigned char c : s)
    if (c < 0x20 || c > 0x7e) return false;
  *out = s;
  return true;
}

bool GetInt(const Json& j, const char* key, int64_t lo, int64_t hi, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return false;
  const int64_t v = it->get<int64_t>();
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

// `path` is <dir>/<name>, name without '/' and not "." or "..".
bool DirectlyInside(const std::string& path, absl::string_view dir) {
  const std::string prefix = absl::StrCat(dir, "/");
  if (path.rfind(prefix, 0) != 0) return false;
  const std::string name = path.substr(prefix.size());
  return !name.empty() && name.size() <= 255 && name.find('/') == std::string::npos && name != "." && name != "..";
}

}  // namespace

bool ParsePciAddress(absl::string_view text, uint16_t* domain, uint8_t* bus, uint8_t* devfn) {
  // DDDD:BB:SS.F, hex.
  if (text.size() != 12 || text[4] != ':' || text[7] != ':' || text[10] != '.') return false;
  auto hex = [](absl::string_view s, uint32_t* v) {
    *v = 0;
    for (char c : s) {
      if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
      *v = *v * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(c))
                                               ? c - '0'
                                               : std::tolower(static_cast<unsigned char>(c)) - 'a' + 10);
    }
    return true;
  };
  uint32_t d, b, s, f;
  if (!hex(text.substr(0, 4), &d) || !hex(text.substr(5, 2), &b) || !hex(text.substr(8, 2), &s) ||
      !hex(text.substr(11, 1), &f))
    return false;
  if (s > 31 || f > 7) return false;
  *domain = static_cast<uint16_t>(d);
  *bus = static_cast<uint8_t>(b);
  *devfn = static_cast<uint8_t>((s << 3) | f);
  return true;
}

absl::StatusOr<DriverEntry> ParseDriverEntry(absl::string_view json, absl::string_view file_name,
                                             absl::string_view control_dir) {
  if (json.size() > kMaxRegistryFileBytes) return Bad("too_big");
  Json j = Json::parse(json.begin(), json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not_json");
  DriverEntry e;
  int64_t v;
  if (!GetInt(j, "pid", 1, INT32_MAX, &v)) return Bad("bad_pid");
  e.pid = static_cast<int32_t>(v);
  if (file_name != absl::StrCat(e.pid, ".json")) return Bad("pid_mismatch");
  std::string transport;
  if (!GetString(j, "transport", 16, &transport)) return Bad("bad_transport");
  if (transport == "vhost-user") {
    e.transport = DriverEntry::Transport::kVhostUser;
  } else if (transport == "pci") {
    e.transport = DriverEntry::Transport::kPci;
  } else {
    return Bad("bad_transport");
  }
  if (j.contains("socket") && !GetString(j, "socket", 4096, &e.socket)) return Bad("bad_socket");
  if (j.contains("pci") && !GetString(j, "pci", 12, &e.pci)) return Bad("bad_pci");
  uint16_t dom;
  uint8_t bus, devfn;
  if (e.transport == DriverEntry::Transport::kPci && !ParsePciAddress(e.pci, &dom, &bus, &devfn))
    return Bad("bad_pci");
  if (j.contains("serial") && !GetString(j, "serial", proto::kMaxSerialLen, &e.serial)) return Bad("bad_serial");
  if (!GetInt(j, "queues", 1, proto::kMaxQueuesPerDevice, &v)) return Bad("bad_queues");
  e.queues = static_cast<uint16_t>(v);
  if (!GetInt(j, "queue_size", 1, proto::kMaxQueueSize, &v)) return Bad("bad_queue_size");
  e.queue_size = static_cast<uint16_t>(v);
  if (!GetString(j, "control_block", 4096, &e.control_block)) return Bad("bad_control_block");
  // The control block must be <control_dir>/<name>: the agent (root) creates
  // and writes it.
  if (!DirectlyInside(e.control_block, control_dir)) return Bad("control_block_outside_dir");
  // The stats block (optional: older drivers and --stats_block= have none):
  // the agent only reads it, but a path anywhere would let a driver make
  // root open any file; same rule.
  if (j.contains("stats_block")) {
    if (!GetString(j, "stats_block", 4096, &e.stats_block)) return Bad("bad_stats_block");
    if (!e.stats_block.empty() && !DirectlyInside(e.stats_block, control_dir)) return Bad("stats_block_outside_dir");
  }
  return e;
}

proto::GuestDevice ToGuestDevice(const DriverEntry& e) {
  proto::GuestDevice d;
  if (e.transport == DriverEntry::Transport::kPci) ParsePciAddress(e.pci, &d.pci_domain, &d.pci_bus, &d.pci_devfn);
  // The protocol's serial has no spaces (vkick-blk's --serial may): '_'.
  d.serial = e.serial;
  std::replace(d.serial.begin(), d.serial.end(), ' ', '_');
  d.num_queues = std::clamp<uint16_t>(e.queues, 1, proto::kMaxQueuesPerDevice);
  d.queue_size = std::clamp<uint16_t>(e.queue_size, 1, proto::kMaxQueueSize);
  return d;
}

RegistryScan ScanRegistry(const std::string& dir, const std::string& control_dir, const std::string& proc_root) {
  RegistryScan scan;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return scan;
  std::vector<std::string> names;
  size_t extra = 0;  // names beyond the scan bound: never read, counted
  while (dirent* de = readdir(d)) {
    std::string n = de->d_name;
    if (n.size() <= 5 || n.compare(n.size() - 5, 5, ".json") != 0) continue;
    if (names.size() < kMaxRegistryFilesPerScan) {
      names.push_back(n);
    } else {
      ++extra;
    }
  }
  if (extra > 0) {
    scan.rejected["too_many"] += extra;
    scan.rejected_files.push_back(absl::StrCat(extra, " more files: too_many"));
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& n : names) {
    const std::string path = absl::StrCat(dir, "/", n);
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
      ++scan.rejected["unreadable"];
      scan.rejected_files.push_back(n + ": unreadable");
      continue;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      close(fd);
      ++scan.rejected["not_regular"];
      scan.rejected_files.push_back(n + ": not_regular");
      continue;
    }
    std::string text(kMaxRegistryFileBytes + 1, '\0');
    size_t got = 0;
    while (got < text.size()) {
      ssize_t r = read(fd, text.data() + got, text.size() - got);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    close(fd);
    text.resize(got);
    auto e = ParseDriverEntry(text, n, control_dir);
    if (!e.ok()) {
      ++scan.rejected[std::string(e.status().message())];
      scan.rejected_files.push_back(absl::StrCat(n, ": ", e.status().message()));
      continue;
    }
    struct stat pst;
    if (stat(absl::StrCat(proc_root, "/", e->pid).c_str(), &pst) != 0) {
      ++scan.rejected["dead_pid"];
      scan.rejected_files.push_back(n + ": dead_pid");
      continue;
    }
    if (scan.drivers.size() >= kMaxRegisteredDrivers) {
      ++scan.rejected["too_many"];
      scan.rejected_files.push_back(n + ": too_many");
      continue;
    }
    scan.drivers.push_back(*std::move(e));
  }
  std::sort(scan.drivers.begin(), scan.drivers.end(),
            [](const DriverEntry& a, const DriverEntry& b) { return a.pid < b.pid; });
  return scan;
}

}  // namespace vkick::agent
