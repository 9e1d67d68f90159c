// The user side of the `notify` map ({tgid, space, addr} -> target) and of
// the counter slots of `queue_counts` (bpf/host_probes.bpf.c): vkickd is
// their only writer, so what each VM owns is kept here, and
// SetNotifyTargets costs one syscall per key (and per new slot) that
// changed, never a walk of the map (at 4096 VMs x 8 queues a walk is 32768
// syscalls per VM, under the lock every VM and the scrape share).
//
// Keys are per process: a VM's targets are installed once for every tgid
// tracked under it (Track; one, its VMM), so the programs match a write with
// one lookup, without the tgid -> vm_id lookup first. The room a VM takes is
// its targets times max(1, its processes): a VM whose process is not
// tracked yet still holds the room for its targets.
//
// Counter slots: every {vm, device, queue} a VM's targets name gets a slot
// of the per-CPU counter array when the targets are installed (a modern
// target: its queue; a legacy one, whose written value is the queue: the
// device's queues that other targets name, or queues 0..3 of a legacy-only
// device, whose queue count is not known here). A VM keeps its slots, and
// so its counts, while it is tracked, also for queues a later Set no longer
// names (a guest's BARs briefly unassigned must not reset counters); Drop
// frees them and the counts go with them. A slot is zeroed before a key
// points to it and reused only after WaitForPrograms (map_ops.h).
//
// A VM's targets are installed all or nothing: a VM whose targets (or new
// slots) do not fit beside the others' has none installed (its writes count
// as unmatched) and Set says kResourceExhausted, so a VM is either counted
// on every queue or visibly left out, never half counted. Its slots go back
// to the pool too (its room goes to others), their counts kept here
// ("carried"), so its counters never go backwards while it is tracked.
// When slots are short, a VM's own slots of queues it no longer names are
// given back (carried the same way) before its Set is refused.
//
// Not thread-safe (HostProbes' callers serialise).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "bpf/host_probes.h"
#include "controller/probes/map_ops.h"
#include "controller/probes/probe_backend.h"

namespace vkick {

class NotifyTargetTable {
 public:
  using Map = MapOps<vkick_notify_key, vkick_notify_target>;

  // `capacity`: the notify map's max_entries; `slot_capacity`: the counter
  // array's. `map` and `slots` must outlive the table.
  NotifyTargetTable(Map* map, size_t capacity, CounterSlotOps* slots, uint32_t slot_capacity)
      : map_(map), capacity_(capacity), slot_ops_(slots), slot_capacity_(slot_capacity) {}

  // Process `tgid` writes for `vm_id` (moved from another VM if it was
  // tracked under one): the VM's targets are installed for it, all or
  // nothing (kResourceExhausted: nothing installed for it).
  absl::Status Track(uint32_t tgid, uint32_t vm_id);
  // Removes the process's keys.
  absl::Status Untrack(uint32_t tgid);
  // Replaces the VM's targets (see above). kInvalidArgument for an unknown
  // address space (nothing changed).
  absl::Status Set(uint32_t vm_id, absl::Span<const NotifyTarget> targets);
  // Removes every target of the VM and frees its slots: its counts are
  // dropped (UntrackProcess). Its processes stay known (Track).
  absl::Status Drop(uint32_t vm_id);

  // One key of a notify map that outlived the vkickd that wrote it (pinned).
  struct Entry {
    vkick_notify_key key;
    vkick_notify_target target;
  };
  // Rebuilds the bookkeeping from such a map's entries, on an empty table:
  // every key's process is tracked again under its target's vm_id, every
  // slot a target names is owned again by its queue, and nothing is zeroed,
  // so a VM that sets the same targets again (same vm_id) keeps its slots
  // and counts without a syscall. Slots no key names are free (they are
  // zeroed when handed out). What lived only in the old table is lost: the
  // carried counts, and slots kept for queues the VM no longer named.
  // kDataLoss, the table left empty, for entries that contradict each
  // other (a slot of two queues or beyond the array, a process under two
  // VMs, a queue in two slots) or do not fit the capacities.
  absl::Status Adopt(absl::Span<const Entry> entries);
  // tgid -> vm_id of every process the table knows (Track, Adopt).
  const std::map<uint32_t, uint32_t>& processes() const { return vm_of_; }

  // The counts' owners, for reading them. Slots are handed out lowest
  // first, so every owned slot is below slot_bound().
  std::optional<ProbeQueueId> SlotOwner(uint32_t slot) const;
  uint32_t slot_bound() const { return static_cast<uint32_t>(owner_.size()); }
  std::optional<uint32_t> SlotOf(const ProbeQueueId& q) const;
  // Counts of slots given back while the VM stayed tracked.
  uint64_t Carried(const ProbeQueueId& q) const;
  template <typename Fn>  // fn(const ProbeQueueId&, uint64_t)
  void ForEachCarried(Fn fn) const {
    for (const auto& [vm_id, vm] : vms_) {
      for (const auto& [q, n] : vm.carried) fn(ProbeQueueId{vm_id, q.first, q.second}, n);
    }
  }

  // Keys reserved (installed, or held for a VM without a process yet).
  size_t size() const { return size_; }
  size_t capacity() const { return capacity_; }
  size_t owned(uint32_t vm_id) const;  // the VM's targets
  size_t slots_used() const { return slots_used_; }
  uint32_t slot_capacity() const { return slot_capacity_; }

 private:
  using Addr = std::pair<uint8_t, uint64_t>;   // space, address
  using Queue = std::pair<uint16_t, uint16_t>;  // device, queue
  using Targets = std::map<Addr, vkick_notify_target>;
  struct Vm {
    Targets targets;                        // as last Set, slots filled in
    std::map<uint32_t, Targets> installed;  // tgid -> its keys in the map
    std::map<Queue, uint32_t> slots;
    std::map<Queue, uint64_t> carried;
  };

  static absl::Status Wanted(absl::Span<const NotifyTarget> targets, Targets* out,
                             std::set<Queue>* queues);
  static size_t Reserved(const Vm& vm);
  // Writes `want` as tgid's keys (deletes first, then updates; no syscall
  // for a key unchanged).
  absl::Status Install(Vm& vm, uint32_t vm_id, uint32_t tgid, const Targets& want);
  // Deletes the keys of `vm` for which `which(value)` holds; false and the
  // error in *status for keys that stay.
  template <typename Pred>
  bool Uninstall(Vm& vm, Pred which, absl::Status* status);
  // Gives `queues`' slots back, their counts carried (no key may point to
  // them any more).
  absl::Status Carry(Vm& vm, const std::vector<Queue>& queues);
  // All the VM's keys deleted and its slots given back, counts carried.
  absl::Status Evict(Vm& vm);
  absl::StatusOr<std::vector<uint32_t>> Allocate(size_t n);
  void Free(uint32_t slot, bool clean);
  size_t FreeSlots() const { return slot_capacity_ - slots_used_; }
  void Fill(const Vm& vm, vkick_notify_target* t) const;
  void Account(const Vm& before_after, bool add);
  void Forget(uint32_t vm_id);  // erases the VM if nothing of it is left
  // Adopt's per-entry step: records the key and claims its slots.
  absl::Status AdoptEntry(const Entry& e);
  absl::Status ClaimSlot(uint32_t slot, const ProbeQueueId& q, Vm& vm);

  Map* const map_;
  const size_t capacity_;
  CounterSlotOps* const slot_ops_;
  const uint32_t slot_capacity_;
  std::map<uint32_t, Vm> vms_;
  std::map<uint32_t, uint32_t> vm_of_;  // tgid -> vm_id
  size_t size_ = 0;                     // sum of Reserved over the VMs
  // Slots: owner_[i] for every slot ever handed out (slot_bound()), those
  // free again in clean_ (reusable now) or quarantine_ (after a wait).
  std::vector<std::optional<ProbeQueueId>> owner_;
  std::set<uint32_t> clean_;
  std::vector<uint32_t> quarantine_;
  size_t slots_used_ = 0;
};

}  // namespace vkick
