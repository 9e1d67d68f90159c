#include "controller/probes/notify_table.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"

namespace vkick {
namespace {

vkick_notify_key KeyOf(uint32_t tgid, uint8_t space, uint64_t addr) {
  vkick_notify_key k{};  // zeroed padding: the kernel compares keys bytewise
  k.tgid = tgid;
  k.space = space;
  k.addr = addr;
  return k;
}

bool SameTarget(const vkick_notify_target& a, const vkick_notify_target& b) {
  return a.vm_id == b.vm_id && a.device_id == b.device_id && a.queue == b.queue &&
         a.value_is_queue == b.value_is_queue &&
         std::equal(std::begin(a.slots), std::end(a.slots), std::begin(b.slots));
}

bool UsesAny(const vkick_notify_target& t, const std::set<uint32_t>& slots) {
  return std::any_of(std::begin(t.slots), std::end(t.slots),
                     [&](uint32_t s) { return slots.contains(s); });
}

}  // namespace

size_t NotifyTargetTable::owned(uint32_t vm_id) const {
  auto it = vms_.find(vm_id);
  return it == vms_.end() ? 0 : it->second.targets.size();
}

std::optional<ProbeQueueId> NotifyTargetTable::SlotOwner(uint32_t slot) const {
  return slot < owner_.size() ? owner_[slot] : std::nullopt;
}

std::optional<uint32_t> NotifyTargetTable::SlotOf(const ProbeQueueId& q) const {
  auto vm = vms_.find(std::get<0>(q));
  if (vm == vms_.end()) return std::nullopt;
  auto it = vm->second.slots.find({std::get<1>(q), std::get<2>(q)});
  if (it == vm->second.slots.end()) return std::nullopt;
  return it->second;
}

uint64_t NotifyTargetTable::Carried(const ProbeQueueId& q) const {
  auto vm = vms_.find(std::get<0>(q));
  if (vm == vms_.end()) return 0;
  auto it = vm->second.carried.find({std::get<1>(q), std::get<2>(q)});
  return it == vm->second.carried.end() ? 0 : it->second;
}

absl::Status NotifyTargetTable::Wanted(absl::Span<const NotifyTarget> targets, Targets* out,
                                       std::set<Queue>* queues) {
  for (const NotifyTarget& t : targets) {
    if (t.space != NotifyTarget::Space::kMmio && t.space != NotifyTarget::Space::kPio) {
      return absl::InvalidArgumentError("notify target with an unknown address space");
    }
    vkick_notify_target v{};
    v.device_id = t.device_id;
    v.queue = t.value_is_queue ? 0 : t.queue;
    v.value_is_queue = t.value_is_queue ? 1 : 0;
    std::fill(std::begin(v.slots), std::end(v.slots), VKICK_NO_SLOT);
    (*out)[{static_cast<uint8_t>(t.space), t.addr}] = v;  // a repeated address: the last wins
  }
  // A slot per queue a modern target names; a legacy target's device shares
  // them (a transitional device: the same queues by either interface). A
  // legacy-only device's queue count is unknown here: queues 0..3 get slots,
  // higher values count in the notify_counts hash.
  std::set<uint16_t> named;
  for (const auto& [addr, v] : *out) {
    if (v.value_is_queue) continue;
    queues->insert({v.device_id, v.queue});
    named.insert(v.device_id);
  }
  for (const auto& [addr, v] : *out) {
    if (!v.value_is_queue || named.contains(v.device_id)) continue;
    for (uint16_t q = 0; q < VKICK_TARGET_SLOTS; ++q) queues->insert({v.device_id, q});
  }
  return absl::OkStatus();
}

size_t NotifyTargetTable::Reserved(const Vm& vm) {
  size_t installed = 0;
  for (const auto& [tgid, keys] : vm.installed) installed += keys.size();
  return std::max(vm.targets.size() * std::max<size_t>(1, vm.installed.size()), installed);
}

void NotifyTargetTable::Account(const Vm& vm, bool add) {
  if (add) {
    size_ += Reserved(vm);
  } else {
    size_ -= Reserved(vm);
  }
}

void NotifyTargetTable::Forget(uint32_t vm_id) {
  auto it = vms_.find(vm_id);
  if (it == vms_.end()) return;
  const Vm& vm = it->second;
  if (vm.targets.empty() && vm.installed.empty() && vm.slots.empty() && vm.carried.empty()) {
    vms_.erase(it);
  }
}

void NotifyTargetTable::Fill(const Vm& vm, vkick_notify_target* t) const {
  std::fill(std::begin(t->slots), std::end(t->slots), VKICK_NO_SLOT);
  if (!t->value_is_queue) {
    t->slots[0] = vm.slots.at({t->device_id, t->queue});
    return;
  }
  for (uint16_t q = 0; q < VKICK_TARGET_SLOTS; ++q) {
    auto it = vm.slots.find({t->device_id, q});
    if (it != vm.slots.end()) t->slots[q] = it->second;
  }
}

absl::Status NotifyTargetTable::Install(Vm& vm, uint32_t vm_id, uint32_t tgid,
                                        const Targets& want) {
  Targets& mine = vm.installed[tgid];
  for (auto it = mine.begin(); it != mine.end();) {
    if (want.contains(it->first)) {
      ++it;
      continue;
    }
    absl::Status s = map_->Delete(KeyOf(tgid, it->first.first, it->first.second));
    if (!s.ok() && !absl::IsNotFound(s)) return s;
    it = mine.erase(it);
  }
  for (const auto& [addr, value] : want) {
    auto have = mine.find(addr);
    if (have != mine.end() && SameTarget(have->second, value)) continue;  // no syscall
    absl::Status s = map_->Update(KeyOf(tgid, addr.first, addr.second), value);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat("adding notify target 0x", absl::Hex(addr.second),
                                                  " of vm_id ", vm_id, " pid ", tgid, ": ",
                                                  s.message()));
    }
    mine[addr] = value;
  }
  return absl::OkStatus();
}

template <typename Pred>
bool NotifyTargetTable::Uninstall(Vm& vm, Pred which, absl::Status* status) {
  bool all = true;
  for (auto& [tgid, keys] : vm.installed) {
    for (auto it = keys.begin(); it != keys.end();) {
      if (!which(it->second)) {
        ++it;
        continue;
      }
      absl::Status s = map_->Delete(KeyOf(tgid, it->first.first, it->first.second));
      if (!s.ok() && !absl::IsNotFound(s)) {
        status->Update(s);  // still in the map: still ours, its slot too
        all = false;
        ++it;
        continue;
      }
      it = keys.erase(it);
    }
  }
  return all;
}

absl::Status NotifyTargetTable::Carry(Vm& vm, const std::vector<Queue>& queues) {
  if (queues.empty()) return absl::OkStatus();
  // No key points to these slots any more; once the programs that may have
  // read one finished, their counts are final.
  if (absl::Status s = slot_ops_->WaitForPrograms(); !s.ok()) return s;
  for (const Queue& q : queues) {
    const uint32_t slot = vm.slots.at(q);
    absl::StatusOr<uint64_t> n = slot_ops_->Sum(slot);
    if (!n.ok()) return n.status();  // the slot stays the VM's: nothing lost
    vm.carried[q] += *n;
    vm.slots.erase(q);
    Free(slot, /*clean=*/true);
  }
  return absl::OkStatus();
}

absl::Status NotifyTargetTable::Evict(Vm& vm) {
  absl::Status status;
  if (!Uninstall(vm, [](const vkick_notify_target&) { return true; }, &status)) return status;
  vm.targets.clear();
  std::vector<Queue> all;
  for (const auto& [q, slot] : vm.slots) all.push_back(q);
  return Carry(vm, all);
}

void NotifyTargetTable::Free(uint32_t slot, bool clean) {
  owner_[slot].reset();
  --slots_used_;
  if (clean) {
    clean_.insert(slot);
  } else {
    quarantine_.push_back(slot);
  }
}

absl::StatusOr<std::vector<uint32_t>> NotifyTargetTable::Allocate(size_t n) {
  if (n > FreeSlots()) {
    return absl::ResourceExhaustedError(absl::StrCat("counter slots full: ", n, " wanted, ",
                                                     FreeSlots(), " free"));
  }
  // Slots freed by a Drop may still be incremented by a program that read
  // a key before it was deleted: wait for those (once, for all of them)
  // only when the slots never used and the clean ones do not suffice.
  const size_t ready = clean_.size() + (slot_capacity_ - owner_.size());
  if (ready < n && !quarantine_.empty()) {
    if (absl::Status s = slot_ops_->WaitForPrograms(); !s.ok()) return s;
    clean_.insert(quarantine_.begin(), quarantine_.end());
    quarantine_.clear();
  }
  std::vector<uint32_t> out;
  while (out.size() < n) {  // lowest first: the owned slots stay below slot_bound()
    if (!clean_.empty()) {
      out.push_back(*clean_.begin());
      clean_.erase(clean_.begin());
    } else {
      out.push_back(static_cast<uint32_t>(owner_.size()));
      owner_.emplace_back();
    }
  }
  for (uint32_t slot : out) {
    if (absl::Status s = slot_ops_->Zero(slot); !s.ok()) {
      clean_.insert(out.begin(), out.end());  // none handed out
      return absl::Status(s.code(), absl::StrCat("zeroing counter slot ", slot, ": ", s.message()));
    }
  }
  slots_used_ += n;
  return out;
}

absl::Status NotifyTargetTable::Set(uint32_t vm_id, absl::Span<const NotifyTarget> targets) {
  Targets wanted;
  std::set<Queue> queues;
  if (absl::Status s = Wanted(targets, &wanted, &queues); !s.ok()) return s;
  Vm& vm = vms_[vm_id];
  Account(vm, false);
  auto done = [&](absl::Status s) {
    Account(vm, true);
    Forget(vm_id);  // last: may erase `vm`
    return s;
  };
  std::vector<Queue> fresh, retired;
  for (const Queue& q : queues) {
    if (!vm.slots.contains(q)) fresh.push_back(q);
  }
  for (const auto& [q, slot] : vm.slots) {
    if (!queues.contains(q)) retired.push_back(q);
  }
  // Decided on our own counts (we are the maps' only writer), before any
  // syscall: a VM that cannot fit costs no failed insert.
  const size_t procs = std::max<size_t>(1, vm.installed.size());
  const size_t others = size_;
  std::string full;
  if (others + wanted.size() * procs > capacity_) {
    full = absl::StrCat("notify map full: vm_id ", vm_id, " needs ", wanted.size(),
                        " notify targets", procs > 1 ? absl::StrCat(" x ", procs, " processes") : "",
                        ", ", capacity_ - others, " of ", capacity_, " free");
  } else if (fresh.size() > FreeSlots() + retired.size()) {
    full = absl::StrCat("counter slots full: vm_id ", vm_id, " needs ", fresh.size(),
                        " new counter slots, ", FreeSlots(), " of ", slot_capacity_, " free");
  }
  if (!full.empty()) {
    absl::Status evicted = Evict(vm);  // all or nothing: its room goes to others
    return done(absl::ResourceExhaustedError(absl::StrCat(
        full, evicted.ok() ? "" : absl::StrCat(" (dropping its old targets: ", evicted.message(), ")"))));
  }
  auto fail = [&](absl::Status s) {
    Evict(vm).IgnoreError();  // the error below says why it is out
    return done(s);
  };
  if (fresh.size() > FreeSlots()) {
    // Short of slots: give back the VM's slots of queues it no longer
    // names, once no key of it points to them (those keys are rewritten
    // below).
    std::set<uint32_t> gone;
    for (const Queue& q : retired) gone.insert(vm.slots.at(q));
    absl::Status s;
    if (!Uninstall(vm, [&](const vkick_notify_target& t) { return UsesAny(t, gone); }, &s)) {
      return fail(s);
    }
    if (s = Carry(vm, retired); !s.ok()) return fail(s);
  }
  absl::StatusOr<std::vector<uint32_t>> slots = Allocate(fresh.size());
  if (!slots.ok()) return fail(slots.status());
  for (size_t i = 0; i < fresh.size(); ++i) {
    vm.slots[fresh[i]] = (*slots)[i];
    owner_[(*slots)[i]] = ProbeQueueId{vm_id, fresh[i].first, fresh[i].second};
  }
  for (auto& [addr, value] : wanted) {
    value.vm_id = vm_id;
    Fill(vm, &value);
  }
  vm.targets = std::move(wanted);
  for (auto& [tgid, keys] : vm.installed) {
    if (absl::Status s = Install(vm, vm_id, tgid, vm.targets); !s.ok()) return fail(s);
  }
  return done(absl::OkStatus());
}

absl::Status NotifyTargetTable::Drop(uint32_t vm_id) {
  auto it = vms_.find(vm_id);
  if (it == vms_.end()) return absl::OkStatus();
  Vm& vm = it->second;
  Account(vm, false);
  absl::Status status;
  if (Uninstall(vm, [](const vkick_notify_target&) { return true; }, &status)) {
    // No key points to the slots: reusable after a wait (Allocate).
    for (const auto& [q, slot] : vm.slots) Free(slot, /*clean=*/false);
    vm.slots.clear();
    vm.carried.clear();
    vm.targets.clear();
  }
  Account(vm, true);
  Forget(vm_id);
  return status;
}

absl::Status NotifyTargetTable::Track(uint32_t tgid, uint32_t vm_id) {
  if (auto it = vm_of_.find(tgid); it != vm_of_.end()) {
    if (it->second == vm_id) return absl::OkStatus();
    if (absl::Status s = Untrack(tgid); !s.ok()) return s;
  }
  Vm& vm = vms_[vm_id];
  Account(vm, false);
  auto done = [&](absl::Status s) {
    Account(vm, true);
    Forget(vm_id);
    return s;
  };
  // A VM without a process already holds the room for one.
  const size_t need = vm.targets.size() * (vm.installed.size() + 1);
  const size_t others = size_, have = Reserved(vm);
  if (others + std::max(need, have) > capacity_) {
    return done(absl::ResourceExhaustedError(absl::StrCat(
        "notify map full: pid ", tgid, " of vm_id ", vm_id, " needs ", vm.targets.size(),
        " notify targets, ", capacity_ - std::min(capacity_, others + have), " of ", capacity_,
        " free")));
  }
  vm_of_[tgid] = vm_id;
  absl::Status s = Install(vm, vm_id, tgid, vm.targets);
  if (!s.ok()) {
    // All or nothing for the process: what went in comes out again.
    Targets& mine = vm.installed[tgid];
    for (auto k = mine.begin(); k != mine.end();) {
      absl::Status d = map_->Delete(KeyOf(tgid, k->first.first, k->first.second));
      k = d.ok() || absl::IsNotFound(d) ? mine.erase(k) : std::next(k);
    }
    if (mine.empty()) {
      vm.installed.erase(tgid);
      vm_of_.erase(tgid);
    }
  }
  return done(s);
}

absl::Status NotifyTargetTable::Untrack(uint32_t tgid) {
  auto it = vm_of_.find(tgid);
  if (it == vm_of_.end()) return absl::OkStatus();
  const uint32_t vm_id = it->second;
  Vm& vm = vms_[vm_id];
  Account(vm, false);
  absl::Status status;
  Targets& mine = vm.installed[tgid];
  for (auto k = mine.begin(); k != mine.end();) {
    absl::Status s = map_->Delete(KeyOf(tgid, k->first.first, k->first.second));
    if (!s.ok() && !absl::IsNotFound(s)) {
      status.Update(s);
      ++k;
      continue;
    }
    k = mine.erase(k);
  }
  if (mine.empty()) {
    vm.installed.erase(tgid);
    vm_of_.erase(tgid);
  }
  Account(vm, true);
  Forget(vm_id);
  return status;
}

absl::Status NotifyTargetTable::ClaimSlot(uint32_t slot, const ProbeQueueId& q, Vm& vm) {
  if (slot == VKICK_NO_SLOT) return absl::OkStatus();
  const Queue queue{std::get<1>(q), std::get<2>(q)};
  if (slot >= slot_capacity_) {
    return absl::DataLossError(absl::StrCat("notify target names counter slot ", slot, ", beyond ",
                                            "the ", slot_capacity_, " slots"));
  }
  if (slot >= owner_.size()) owner_.resize(slot + 1);
  if (owner_[slot].has_value()) {
    if (*owner_[slot] == q) return absl::OkStatus();  // another key or process of the queue
    return absl::DataLossError(absl::StrCat("counter slot ", slot, " is named for two queues"));
  }
  if (auto it = vm.slots.find(queue); it != vm.slots.end() && it->second != slot) {
    return absl::DataLossError(absl::StrCat("vm_id ", std::get<0>(q), " device ", queue.first,
                                            " queue ", queue.second, " has two counter slots"));
  }
  owner_[slot] = q;
  vm.slots[queue] = slot;
  ++slots_used_;
  return absl::OkStatus();
}

absl::Status NotifyTargetTable::AdoptEntry(const Entry& e) {
  const vkick_notify_target& t = e.target;
  const uint32_t tgid = e.key.tgid;
  if (auto it = vm_of_.find(tgid); it != vm_of_.end() && it->second != t.vm_id) {
    return absl::DataLossError(absl::StrCat("pid ", tgid, " has notify keys of vm_id ", it->second,
                                            " and ", t.vm_id));
  }
  if (e.key.space != VKICK_SPACE_MMIO && e.key.space != VKICK_SPACE_PIO) {
    return absl::DataLossError(absl::StrCat("notify key of pid ", tgid, " has address space ",
                                            e.key.space));
  }
  Vm& vm = vms_[t.vm_id];
  vm_of_[tgid] = t.vm_id;
  const Addr addr{e.key.space, e.key.addr};
  vm.installed[tgid][addr] = t;
  vm.targets[addr] = t;  // every process of a VM has the same targets
  for (uint16_t i = 0; i < VKICK_TARGET_SLOTS; ++i) {
    if (!t.value_is_queue && i > 0) {
      if (t.slots[i] != VKICK_NO_SLOT) {
        return absl::DataLossError("a modern notify target names more than one counter slot");
      }
      continue;
    }
    const uint16_t queue = t.value_is_queue ? i : t.queue;
    if (absl::Status s = ClaimSlot(t.slots[i], ProbeQueueId{t.vm_id, t.device_id, queue}, vm);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status NotifyTargetTable::Adopt(absl::Span<const Entry> entries) {
  if (!vms_.empty() || !owner_.empty()) {
    return absl::FailedPreconditionError("Adopt on a table already in use");
  }
  absl::Status s;
  for (const Entry& e : entries) {
    if (s = AdoptEntry(e); !s.ok()) break;
  }
  for (const auto& [vm_id, vm] : vms_) size_ += Reserved(vm);
  if (s.ok() && size_ > capacity_) {
    s = absl::DataLossError(absl::StrCat(size_, " notify keys, more than the map's ", capacity_));
  }
  if (!s.ok()) {
    vms_.clear();
    vm_of_.clear();
    owner_.clear();
    size_ = slots_used_ = 0;
    return s;
  }
  // Unowned slots below the bound: no key names them (their programs are
  // long done), so they are free now; Allocate zeroes them.
  for (uint32_t i = 0; i < owner_.size(); ++i) {
    if (!owner_[i]) clean_.insert(i);
  }
  return absl::OkStatus();
}

}  // namespace vkick
