#include "controller/probes/notify_table.h"

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {

vkick_notify_key KeyOf(uint32_t vm_id, uint8_t space, uint64_t addr) {
  vkick_notify_key k{};  // zeroed padding: the kernel compares keys bytewise
  k.vm_id = vm_id;
  k.space = space;
  k.addr = addr;
  return k;
}

bool SameTarget(const vkick_notify_target& a, const vkick_notify_target& b) {
  return a.device_id == b.device_id && a.queue == b.queue && a.value_is_queue == b.value_is_queue;
}

}  // namespace

size_t NotifyTargetTable::owned(uint32_t vm_id) const {
  auto it = owned_.find(vm_id);
  return it == owned_.end() ? 0 : it->second.size();
}

absl::Status NotifyTargetTable::Wanted(absl::Span<const NotifyTarget> targets, Targets* out) {
  for (const NotifyTarget& t : targets) {
    if (t.space != NotifyTarget::Space::kMmio && t.space != NotifyTarget::Space::kPio) {
      return absl::InvalidArgumentError("notify target with an unknown address space");
    }
    vkick_notify_target v{};
    v.device_id = t.device_id;
    v.queue = t.queue;
    v.value_is_queue = t.value_is_queue ? 1 : 0;
    (*out)[{static_cast<uint8_t>(t.space), t.addr}] = v;  // a repeated address: the last wins
  }
  return absl::OkStatus();
}

absl::Status NotifyTargetTable::Set(uint32_t vm_id, absl::Span<const NotifyTarget> targets) {
  Targets wanted;
  if (absl::Status s = Wanted(targets, &wanted); !s.ok()) return s;
  Targets old;
  if (auto it = owned_.find(vm_id); it != owned_.end()) old = it->second;
  // Decided on our own count (we are the map's only writer), before any
  // syscall: a VM that cannot fit costs no failed insert.
  const size_t others = size_ - old.size();
  if (others + wanted.size() > capacity_) {
    absl::Status dropped = Drop(vm_id);  // all or nothing: its room goes to others
    return absl::ResourceExhaustedError(absl::StrCat(
        "notify map full: vm_id ", vm_id, " needs ", wanted.size(), " notify targets, ",
        capacity_ - others, " of ", capacity_, " free",
        dropped.ok() ? "" : absl::StrCat(" (dropping its old targets: ", dropped.message(), ")")));
  }
  absl::Status s = Install(vm_id, old, wanted);
  if (!s.ok()) {
    Drop(vm_id).IgnoreError();  // the error below says why it is out
    return s;
  }
  return absl::OkStatus();
}

// Deletes the old keys that are not wanted, then writes the wanted ones
// that are new or changed (in that order, so the deletes make the room).
absl::Status NotifyTargetTable::Install(uint32_t vm_id, const Targets& old,
                                        const Targets& wanted) {
  Targets& mine = owned_[vm_id];
  for (const auto& [addr, value] : old) {
    if (wanted.contains(addr)) continue;
    absl::Status s = map_->Delete(KeyOf(vm_id, addr.first, addr.second));
    if (!s.ok() && !absl::IsNotFound(s)) return s;
    mine.erase(addr);
    --size_;
  }
  for (const auto& [addr, value] : wanted) {
    auto have = mine.find(addr);
    if (have != mine.end() && SameTarget(have->second, value)) continue;  // no syscall
    absl::Status s = map_->Update(KeyOf(vm_id, addr.first, addr.second), value);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("adding notify target 0x", absl::Hex(addr.second),
                                                  " of vm_id ", vm_id, ": ", s.message()));
    }
    if (have == mine.end()) ++size_;
    mine[addr] = value;
  }
  if (mine.empty()) owned_.erase(vm_id);
  return absl::OkStatus();
}

absl::Status NotifyTargetTable::Drop(uint32_t vm_id) {
  auto it = owned_.find(vm_id);
  if (it == owned_.end()) return absl::OkStatus();
  absl::Status status;
  for (auto addr = it->second.begin(); addr != it->second.end();) {
    absl::Status s = map_->Delete(KeyOf(vm_id, addr->first.first, addr->first.second));
    if (!s.ok() && !absl::IsNotFound(s)) {
      status.Update(s);  // still in the map: still ours, still counted
      ++addr;
      continue;
    }
    addr = it->second.erase(addr);
    --size_;
  }
  if (it->second.empty()) owned_.erase(it);
  return status;
}

}  // namespace vkick
