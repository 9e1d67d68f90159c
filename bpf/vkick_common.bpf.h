/* What every vkick BPF program shares (host_probes, vkick_agent,
 * vkick_blockobs), in one copy, like ghOSt's common.bpf.h: the per-CPU
 * `errors` array and its counter, the current tgid, and the
 * lookup-or-insert of a bounded per-CPU hash.
 *
 * The including program defines VKICK_ERR_SLOTS (its own enum's count)
 * before the include: the error indices are each program's ABI with its C++
 * reader, only the mechanism is common. The map keeps the name `errors` in
 * every object, so the readers (HostProbes, UsdtProbes, BlockObserver) find
 * it by that name. BPF-only (after vmlinux.h and bpf_helpers.h).
 */
#ifndef VKICK_BPF_VKICK_COMMON_BPF_H_
#define VKICK_BPF_VKICK_COMMON_BPF_H_

#ifndef VKICK_ERR_SLOTS
#error "define VKICK_ERR_SLOTS (the program's error count) before including vkick_common.bpf.h"
#endif

/* bpf_map_update_elem(BPF_NOEXIST) on a key another CPU inserted meanwhile. */
#define VKICK_EEXIST 17

/* Failures the hot path cannot report otherwise: counted, per CPU, never
 * silently lost (the program's enum names the slots). */
struct {
  __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
  __uint(max_entries, VKICK_ERR_SLOTS);
  __type(key, __u32);
  __type(value, __u64);
} errors SEC(".maps");

static __always_inline void count_error(__u32 idx) {
  __u64* v = bpf_map_lookup_elem(&errors, &idx);
  if (v) *v += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline __u32 current_tgid(void) {
  return (__u32)(bpf_get_current_pid_tgid() >> 32);
}

/* The value of `key` in a bounded hash, inserted as `init` when absent; NULL
 * (and error `full_err` counted) when the map is full. A key another CPU
 * inserted between our lookup and insert (-EEXIST) is found by the second
 * lookup, so a race is never miscounted as a full map. The common case, a
 * key that exists, is one lookup. */
static __always_inline void* vkick_lookup_or_init(void* map, const void* key, const void* init,
                                                  __u32 full_err) {
  void* v = bpf_map_lookup_elem(map, key);
  if (v) return v;
  long err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
  if (err == 0 || err == -VKICK_EEXIST) v = bpf_map_lookup_elem(map, key);
  if (!v) count_error(full_err);
  return v;
}

#endif /* VKICK_BPF_VKICK_COMMON_BPF_H_ */
