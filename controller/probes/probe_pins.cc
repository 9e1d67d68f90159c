#include "controller/probes/probe_pins.h"

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/unique_fd.h"
#include "controller/probes/map_read.h"

namespace vkick {
namespace {

constexpr long kBpfFsMagic = 0xcafe4a11;  // BPF_FS_MAGIC, linux/magic.h

absl::Status MakeDir(const std::string& path) {
  if (mkdir(path.c_str(), 0700) == 0 || errno == EEXIST) return absl::OkStatus();
  return ProbeErrnoStatus(errno, absl::StrCat("creating pin directory ", path));
}

absl::Status UnpinAll(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return errno == ENOENT ? absl::OkStatus()
                           : ProbeErrnoStatus(errno, absl::StrCat("listing ", dir));
  }
  absl::Status status;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string path = absl::StrCat(dir, "/", e->d_name);
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      status.Update(ProbeErrnoStatus(errno, absl::StrCat("unpinning ", path)));
    }
  }
  closedir(d);
  return status;
}

// A type's layout as text, typedefs and qualifiers resolved to what they
// name: two maps whose key (or value) renders the same have the same
// bytes at the same offsets with the same meaning (names included).
std::string Layout(const btf* b, uint32_t id, int depth = 0) {
  if (id == 0) return "void";
  const btf_type* t = btf__type_by_id(b, id);
  if (t == nullptr || depth > 16) return "?";
  const std::string name = btf__name_by_offset(b, t->name_off) ?: "";
  switch (btf_kind(t)) {
    case BTF_KIND_TYPEDEF:
    case BTF_KIND_CONST:
    case BTF_KIND_VOLATILE:
    case BTF_KIND_RESTRICT:
    case BTF_KIND_TYPE_TAG:
      return Layout(b, t->type, depth + 1);
    case BTF_KIND_INT:
      return absl::StrCat("int", t->size, "/", btf_int_encoding(t));
    case BTF_KIND_ENUM:
    case BTF_KIND_ENUM64:
      return absl::StrCat("enum", t->size);
    case BTF_KIND_ARRAY: {
      const struct btf_array* a = btf_array(t);
      return absl::StrCat(Layout(b, a->type, depth + 1), "[", a->nelems, "]");
    }
    case BTF_KIND_STRUCT:
    case BTF_KIND_UNION: {
      std::string out = absl::StrCat(btf_kind(t) == BTF_KIND_STRUCT ? "struct " : "union ", name,
                                     "(", t->size, "){");
      const btf_member* m = btf_members(t);
      for (int i = 0; i < btf_vlen(t); ++i) {
        absl::StrAppend(&out, btf__name_by_offset(b, m[i].name_off) ?: "", "@",
                        btf_member_bit_offset(t, i), ":", Layout(b, m[i].type, depth + 1), ";");
      }
      return out + "}";
    }
    default:
      return absl::StrCat("kind", btf_kind(t), " ", name);
  }
}

struct BtfFree {
  void operator()(btf* b) const { btf__free(b); }
};

}  // namespace

absl::Status MakePinDirs(const PinPaths& p) {
  struct statfs fs{};
  const std::string parent = p.dir.substr(0, p.dir.find_last_of('/') + 1);
  if (statfs(parent.empty() ? "." : parent.c_str(), &fs) != 0) {
    return ProbeErrnoStatus(errno, absl::StrCat("--pin-dir ", p.dir, ": its parent"));
  }
  if (fs.f_type != kBpfFsMagic) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--pin-dir ", p.dir, " is not on a bpffs (mount -t bpf bpf /sys/fs/bpf), or pass "
        "--pin-dir= to run without pinning"));
  }
  for (const std::string& d : {p.dir, p.maps(), p.links()}) {
    if (absl::Status s = MakeDir(d); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status RemovePins(const PinPaths& p) {
  absl::Status s = UnpinAll(p.links());
  s.Update(UnpinAll(p.maps()));
  return s;
}

absl::StatusOr<std::string> PinnedMapMismatch(const bpf_map* map, const btf* obj_btf,
                                              const std::string& path) {
  UniqueFd fd(bpf_obj_get(path.c_str()));
  if (fd.get() < 0) {
    if (errno == ENOENT) return absl::NotFoundError(path);
    return ProbeErrnoStatus(errno, absl::StrCat("opening pinned map ", path));
  }
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd.get(), &info, &len) != 0) {
    return absl::StrCat(path, " is not a map");  // a stranger's pin: replaced
  }
  const char* name = bpf_map__name(map);
  auto differs = [&](const char* what, uint64_t pinned, uint64_t ours) {
    return absl::StrCat("map ", name, ": pinned ", what, " ", pinned, ", this vkickd's ", ours);
  };
  if (info.type != bpf_map__type(map)) return differs("type", info.type, bpf_map__type(map));
  if (info.key_size != bpf_map__key_size(map)) {
    return differs("key size", info.key_size, bpf_map__key_size(map));
  }
  if (info.value_size != bpf_map__value_size(map)) {
    return differs("value size", info.value_size, bpf_map__value_size(map));
  }
  if (info.max_entries != bpf_map__max_entries(map)) {
    return differs("max_entries (--max-vms, --max-queues-per-vm, --max-vcpus-per-vm)",
                   info.max_entries, bpf_map__max_entries(map));
  }
  if (info.map_flags != bpf_map__map_flags(map)) {
    return differs("flags", info.map_flags, bpf_map__map_flags(map));
  }
  if (info.btf_id == 0 || obj_btf == nullptr) return std::string();  // sizes are all we have
  std::unique_ptr<btf, BtfFree> pinned(btf__load_from_kernel_by_id(info.btf_id));
  if (pinned == nullptr) return ProbeErrnoStatus(errno, absl::StrCat("reading the BTF of ", path));
  const std::string key = Layout(pinned.get(), info.btf_key_type_id);
  const std::string value = Layout(pinned.get(), info.btf_value_type_id);
  const std::string our_key = Layout(obj_btf, bpf_map__btf_key_type_id(map));
  const std::string our_value = Layout(obj_btf, bpf_map__btf_value_type_id(map));
  if (key != our_key) {
    return absl::StrCat("map ", name, ": key layout changed: pinned ", key, ", now ", our_key);
  }
  if (value != our_value) {
    return absl::StrCat("map ", name, ": value layout changed: pinned ", value, ", now ",
                        our_value);
  }
  return std::string();
}

absl::StatusOr<uint32_t> MapIdOf(int map_fd) {
  bpf_map_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(map_fd, &info, &len) != 0) {
    return ProbeErrnoStatus(errno, "reading a map's id");
  }
  return info.id;
}

absl::StatusOr<std::string> PinnedLinkMismatch(int link_fd, int prog_fd,
                                               const std::set<uint32_t>& map_ids) {
  bpf_link_info link{};
  uint32_t len = sizeof(link);
  if (bpf_obj_get_info_by_fd(link_fd, &link, &len) != 0) return std::string("not a link");
  UniqueFd old(bpf_prog_get_fd_by_id(link.prog_id));
  if (old.get() < 0) return ProbeErrnoStatus(errno, "opening a pinned link's program");
  bpf_prog_info ours{};
  len = sizeof(ours);
  if (bpf_obj_get_info_by_fd(prog_fd, &ours, &len) != 0) {
    return ProbeErrnoStatus(errno, "reading a program's tag");
  }
  std::vector<uint32_t> ids(64);
  bpf_prog_info theirs{};
  theirs.nr_map_ids = ids.size();
  theirs.map_ids = reinterpret_cast<uintptr_t>(ids.data());
  len = sizeof(theirs);
  if (bpf_obj_get_info_by_fd(old.get(), &theirs, &len) != 0) {
    return ProbeErrnoStatus(errno, "reading a pinned link's program");
  }
  if (std::memcmp(theirs.tag, ours.tag, sizeof(ours.tag)) != 0) {
    return absl::StrCat("other code (program tag ",
                        absl::BytesToHexString(absl::string_view(
                            reinterpret_cast<const char*>(theirs.tag), sizeof(theirs.tag))),
                        ")");
  }
  if (theirs.nr_map_ids > ids.size()) return std::string("uses too many maps");
  for (uint32_t i = 0; i < theirs.nr_map_ids; ++i) {
    if (map_ids.contains(ids[i])) continue;
    UniqueFd m(bpf_map_get_fd_by_id(ids[i]));
    bpf_map_info mi{};
    uint32_t mlen = sizeof(mi);
    if (m.get() < 0 || bpf_obj_get_info_by_fd(m.get(), &mi, &mlen) != 0) {
      return absl::StrCat("uses map id ", ids[i], ", which cannot be read");
    }
    if (std::strchr(mi.name, '.') == nullptr) {
      return absl::StrCat("uses another map ", mi.name, " (id ", ids[i], ") than the pinned ones");
    }
  }
  return std::string();
}

}  // namespace vkick
