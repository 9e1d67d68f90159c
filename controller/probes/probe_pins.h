// What the host probes leave in bpffs so that nothing is lost across a
// vkickd restart (--pin-dir, docs/operations.md "Pinned maps and links"):
// <dir>/maps/<map name> and <dir>/links/<program name>. These helpers
// decide whether what is pinned can be reused by the BPF object about to
// load; HostProbes does the reusing.
#pragma once

#include <bpf/libbpf.h>

#include <cstdint>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace vkick {

struct PinPaths {
  std::string dir;
  std::string maps() const { return dir + "/maps"; }
  std::string links() const { return dir + "/links"; }
  std::string map(const char* name) const { return maps() + "/" + name; }
  std::string link(const char* name) const { return links() + "/" + name; }
};

// Creates the directories (bpffs allows mkdir). kFailedPrecondition when
// `dir` is not on a bpffs (pins elsewhere fail with EPERM, late and vague).
absl::Status MakePinDirs(const PinPaths& p);
// Unpins every map and link under the directories: once no process holds
// them, the links detach and the maps are freed.
absl::Status RemovePins(const PinPaths& p);

// Whether the map pinned at `path` is what `map` (opened, not loaded)
// would create: type, key and value size, max_entries, flags, and the
// key's and value's BTF layout (member names, offsets, sizes; a changed
// struct after an upgrade). "" when it is; else why not. kNotFound: no pin.
absl::StatusOr<std::string> PinnedMapMismatch(const bpf_map* map, const btf* obj_btf,
                                              const std::string& path);

// Whether the program of pinned link `link_fd` is the same code as
// `prog_fd` (the program tag: a hash of the instructions, map references
// excluded) and uses no map outside `map_ids` but internal ones (.rodata,
// .bss: per object, their ids always differ). "" when it is; else why not.
absl::StatusOr<std::string> PinnedLinkMismatch(int link_fd, int prog_fd,
                                               const std::set<uint32_t>& map_ids);

// The kernel id of a BPF object (map or program) by its fd.
absl::StatusOr<uint32_t> MapIdOf(int map_fd);

}  // namespace vkick
